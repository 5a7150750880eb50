"""The application API: a trained tokenizer behind ``from_pretrained`` / ``encode`` / ``decode``.

::

    tok = simvq.Tokenizer.from_pretrained("runs/photos-small/model")   # a folder, or a Hugging Face Hub id
    indices = tok.encode(images)          # (B, C, H, W) float in [0, 1] or uint8 -> (B, h, w) int64
    images = tok.decode(indices)          # -> (B, C, H, W) float in [0, 1]

Model folders follow the Hugging Face layout (``config.json`` + ``model.safetensors``, what
``PyTorchModelHubMixin`` writes); :meth:`Tokenizer.save_pretrained` also writes ``config.yaml`` so that the
folder stays a simvq model directory (``simvq eval`` / ``simvq encode``), and folders holding only
``config.yaml`` (written by training or ``simvq convert``) keep loading. A name that is not a local folder is
looked up on the Hub with ``huggingface_hub`` (cached; ``local_files_only=True`` works offline).

Inputs:

- images: a ``(B, C, H, W)`` or ``(C, H, W)`` tensor / numpy array, float in ``[0, 1]`` or ``uint8`` in
  ``[0, 255]``; a PIL image; an image path; or a list of PIL images / paths of one size (``size=`` resizes the
  short side and centre-crops). Height and width must be multiples of :attr:`Tokenizer.downsample_factor`.
- audio: ``(B, T)``, ``(B, 1, T)`` or ``(T,)`` float waveforms at ``sample_rate`` (default: the model's rate;
  other rates are resampled with a polyphase filter), or wav/flac paths (read, mixed to mono, resampled).

:meth:`Tokenizer.encode` returns int64 indices (``(B, h, w)`` images, ``(B, T')`` audio; residual quantizers
add a trailing level axis); :meth:`Tokenizer.decode` returns float images in ``[0, 1]`` (``output="uint8"``
or ``"pil"`` on request) or waveforms ``(B, 1, T' * hop)`` in ``[-1, 1]``. Both run batched under
``torch.inference_mode`` on the tokenizer's device and dtype.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from simvq.checkpoints import CONFIG_FILE, WEIGHTS_FILE, load_model_dir, save_model_dir
from simvq.modalities import bits_per_token, build_tokenizer, modality_of
from simvq.pretrained import list_models, model_path

HF_CONFIG_FILE = "config.json"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:
        return obj.item()
    return obj


def _read_local_dir(directory: Path) -> tuple[dict, dict]:
    """``(state_dict, config)`` of a local folder: ``config.json`` (HF layout) or ``config.yaml``."""
    if (directory / HF_CONFIG_FILE).is_file() and not (directory / CONFIG_FILE).is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            config = json.loads((directory / HF_CONFIG_FILE).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{directory / HF_CONFIG_FILE} is not valid JSON ({err})") from err
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{directory} is not a complete model folder: {WEIGHTS_FILE} is missing")
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"{weights} is not a readable safetensors file (truncated or corrupt?): {err}") from err
        return state, config
    return load_model_dir(directory)


def _download(repo_id: str, *, revision, cache_dir, local_files_only: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise FileNotFoundError(
            f"{repo_id} is not a local folder, and huggingface_hub (needed for Hub ids) is not installed: "
            "pip install huggingface_hub"
        ) from err
    try:
        path = snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
            allow_patterns=[HF_CONFIG_FILE, CONFIG_FILE, WEIGHTS_FILE],
        )
    except Exception as err:  # HFValidationError, offline, not found, gated: one line for the user
        raise FileNotFoundError(
            f"{repo_id} is neither a local model folder nor a downloadable Hub model ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    return Path(path)


class Tokenizer:
    """A trained image or audio tokenizer with its config, on one device and dtype (see the module docstring).

    Args:
        model: the tokenizer module (``ImageTokenizer`` / ``AudioTokenizer``).
        config: its full config (``modality``, ``model``, ``quantizer`` sections at least).
        device: where to run (default: where the model is).
        dtype: floating dtype of the network (``torch.bfloat16`` ...; the code search stays fp32).
    """

    def __init__(self, model: torch.nn.Module, config: dict, *, device=None, dtype: torch.dtype | None = None) -> None:
        self.config = config
        self.modality = modality_of(config)
        self.model = model.eval()
        device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(device=device)
        if dtype is not None:
            if not dtype.is_floating_point:
                raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
            self.model.to(dtype=dtype)
        self.device = device
        self.dtype = dtype or next(model.parameters()).dtype

    # ----- loading and saving --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        device=None,
        dtype: torch.dtype | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
    ) -> "Tokenizer":
        """Load a local model folder, a tokenizer shipped with the package by name (``"fashion-8k"``,
        ``"speech-4k"``; ``simvq models`` lists them) or a Hugging Face Hub model id (``owner/name``)."""
        path = Path(name_or_path).expanduser()
        if not path.is_dir() and model_path(str(name_or_path)) is not None:
            path = model_path(str(name_or_path))  # a tokenizer shipped with the package (simvq models)
        if not path.is_dir():
            if path.exists() or not _HUB_ID.fullmatch(str(name_or_path)):
                raise FileNotFoundError(
                    f"model folder {name_or_path} does not exist (nor is it a shipped model: {', '.join(list_models())}; "
                    "nor a Hub id 'owner/name')"
                )
            path = _download(str(name_or_path), revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
        state, config = _read_local_dir(path)
        model = build_tokenizer(config)
        model.load_state_dict(state, strict=True)
        return cls(model, config, device=device or "cpu", dtype=dtype)

    def save_pretrained(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (Hugging Face layout) and ``config.yaml`` (simvq)."""
        from simvq.io import save_file_atomic

        directory = Path(directory)
        if not overwrite and (directory / HF_CONFIG_FILE).exists():
            raise FileExistsError(f"{directory} already holds a model; choose another folder or pass overwrite=True")
        state = {k: v.float() if v.is_floating_point() else v for k, v in self.model.state_dict().items()}
        save_model_dir(directory, state, self.config, overwrite=overwrite)
        save_file_atomic(directory / HF_CONFIG_FILE, json.dumps(_json_safe(self.config), indent=2))
        return directory

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Tokenizer":
        if device is not None:
            self.device = torch.device(device)
            self.model.to(device=self.device)
        if dtype is not None:
            self.model.to(dtype=dtype)
            self.dtype = dtype
        return self

    # ----- properties ----------------------------------------------------------------------------------
    @property
    def modality_name(self) -> str:
        return self.modality.name

    @property
    def is_audio(self) -> bool:
        return not self.modality.token_grid

    @property
    def codebook_size(self) -> int:
        return int(self.model.quantize.codebook_size)

    @property
    def index_levels(self) -> int:
        """Index columns per token (1; the depth of a residual stack)."""
        return int(getattr(self.model.quantize, "index_levels", 1))

    @property
    def bits_per_token(self) -> float:
        return bits_per_token(self.model.quantize)

    @property
    def downsample_factor(self) -> int:
        """Pixels (images) or samples (audio) per token along each axis."""
        return int(self.model.hop_length if self.is_audio else self.model.downsample_factor)

    @property
    def sample_rate(self) -> int | None:
        return int(self.model.sample_rate) if self.is_audio else None

    @property
    def hop_length(self) -> int | None:
        return int(self.model.hop_length) if self.is_audio else None

    @property
    def tokens_per_second(self) -> float | None:
        return float(self.model.tokens_per_second) if self.is_audio else None

    @property
    def bitrate(self) -> float:
        """Bits per second (audio) or bits per image at the config's image size (images)."""
        if self.is_audio:
            return float(self.model.bitrate)
        return float(np.prod(self.grid_shape)) * self.bits_per_token

    @property
    def image_size(self) -> int | None:
        return None if self.is_audio else int(self.config.get("data", {}).get("image_size") or 0) or None

    @property
    def in_channels(self) -> int:
        return 1 if self.is_audio else int(self.model.in_channels)

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Token grid ``(h, w)`` of an image at the config's size; audio: ``(tokens_per_second,)``."""
        if self.is_audio:
            return (int(round(self.model.tokens_per_second)),)
        return self.token_shape(self.image_size, self.image_size)

    def token_shape(self, height: int, width: int | None = None) -> tuple[int, ...]:
        """Token grid of a ``height x width`` image, or ``(T',)`` for ``height`` audio samples."""
        f = self.downsample_factor
        if self.is_audio:
            return (-(-int(height) // f),)
        return int(height) // f, int(width if width is not None else height) // f

    # ----- inputs --------------------------------------------------------------------------------------
    def _load_image(self, item, size: int | None) -> torch.Tensor:
        """One path / PIL image / array -> ``(C, H, W)`` float in [0, 1]."""
        from simvq.modalities.image.data import load_image_file, to_tensor

        channels = self.in_channels
        if isinstance(item, (str, os.PathLike)):
            return load_image_file(item, channels=channels, size=size).add(1).div(2)
        if hasattr(item, "convert") and hasattr(item, "size"):  # PIL image
            if size is not None:
                from PIL import ImageOps

                item = ImageOps.fit(item, (size, size))
            return to_tensor(np.asarray(item.convert("RGB" if channels == 3 else "L"))).add(1).div(2)
        raise TypeError(f"cannot encode a {type(item).__name__} as an image; pass a tensor, a PIL image or a path")

    def _images(self, x, size: int | None) -> torch.Tensor:
        """Any supported image input -> ``(B, C, H, W)`` float in [-1, 1] on the device."""
        if isinstance(x, (str, os.PathLike)) or (hasattr(x, "convert") and hasattr(x, "size")):
            x = [x]
        if isinstance(x, (list, tuple)):
            items = [self._load_image(item, size) for item in x]
            shapes = {tuple(t.shape) for t in items}
            if len(shapes) > 1:
                raise ValueError(f"images of different sizes {sorted(shapes)} cannot form one batch; pass size= or encode them one at a time")
            x = torch.stack(items)
        else:
            x = torch.as_tensor(x)
            if x.dtype == torch.uint8:
                x = x.float() / 255.0
            elif not x.is_floating_point():
                raise TypeError(f"images must be float in [0, 1] or uint8, got dtype {x.dtype}")
        if x.dim() == 3:
            x = x[None]
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"images must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        f = self.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"image height and width must be multiples of {f}, got {x.shape[2]}x{x.shape[3]}; pass size= or crop")
        return (x.to(self.device, torch.float32) * 2 - 1).to(self.dtype)

    def _audio(self, x, sample_rate: int | None) -> torch.Tensor:
        """Any supported audio input -> ``(B, 1, T)`` at the model's rate on the device."""
        from simvq.modalities.audio.data import read_audio, resample

        rate = self.sample_rate
        if isinstance(x, (str, os.PathLike)):
            x = [x]
        if isinstance(x, (list, tuple)) and x and isinstance(x[0], (str, os.PathLike)):
            waves = [read_audio(p, sample_rate=rate) for p in x]
            if len({w.shape[0] for w in waves}) > 1:
                raise ValueError("audio files of different lengths cannot form one batch; encode them one at a time")
            x = torch.from_numpy(np.stack(waves))
        else:
            x = torch.as_tensor(x)
            if not x.is_floating_point():
                raise TypeError(f"waveforms must be floating point in [-1, 1], got dtype {x.dtype}")
            if sample_rate is not None and int(sample_rate) != rate:
                rows = x.reshape(-1, x.shape[-1]).double().cpu().numpy()
                x = torch.from_numpy(np.stack([resample(r, int(sample_rate), rate) for r in rows])).reshape(*x.shape[:-1], -1)
        if x.dim() == 1:
            x = x[None]
        if x.dim() == 2:
            x = x[:, None]
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"waveforms must have shape (B, T), (B, 1, T) or (T,), got {tuple(x.shape)}")
        return x.to(self.device, self.dtype)

    def preprocess(self, x, *, size: int | None = None, sample_rate: int | None = None) -> torch.Tensor:
        """The model-ready batch for an input: images ``(B, C, H, W)`` in [-1, 1], audio ``(B, 1, T)``."""
        return self._audio(x, sample_rate) if self.is_audio else self._images(x, size)

    # ----- encode / decode -----------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, x, *, batch_size: int | None = None, size: int | None = None, sample_rate: int | None = None) -> torch.Tensor:
        """int64 indices of a batch of images or waveforms (see the module docstring), on the tokenizer's
        device; ``batch_size`` splits large batches."""
        x = self.preprocess(x, size=size, sample_rate=sample_rate)
        step = batch_size or x.shape[0]
        return torch.cat([self.model.encode(x[i : i + step]).indices for i in range(0, x.shape[0], step)])

    def _check_indices(self, indices) -> torch.Tensor:
        return self._valid_indices(indices).long().to(self.device)

    def _valid_indices(self, indices) -> torch.Tensor:
        """``indices`` checked (integer dtype, layout, range) and batched, where they are (no copy to the device)."""
        indices = torch.as_tensor(indices)
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"indices must be integers, got dtype {indices.dtype}")
        grid_dims = 1 if self.is_audio else 2
        levels = self.index_levels
        want = grid_dims + (levels > 1)
        if indices.dim() == want:
            indices = indices[None]
        layout = "(B, T')" if self.is_audio else "(B, h, w)"
        layout = layout[:-1] + f", {levels})" if levels > 1 else layout
        if indices.dim() != want + 1 or (levels > 1 and indices.shape[-1] != levels):
            raise ValueError(f"indices must have shape {layout} for this {self.modality.name} tokenizer, got {tuple(indices.shape)}")
        if indices.numel() == 0 or any(s == 0 for s in indices.shape):
            raise ValueError(f"indices of shape {tuple(indices.shape)} hold no tokens")
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= self.codebook_size:
            raise ValueError(f"indices must lie in [0, {self.codebook_size}), got values in [{lo}, {hi}]; were they made by another model?")
        return indices

    @torch.inference_mode()
    def decode(self, indices, *, batch_size: int | None = None, length: int | None = None, output: str = "float"):
        """Images ``(B, C, H, W)`` float in [0, 1] (``output="uint8"`` / ``"pil"``: uint8 tensor / PIL list) or
        waveforms ``(B, 1, T)`` in [-1, 1] (``length`` trims them to ``T`` samples)."""
        if output not in ("float", "uint8", "pil"):
            raise ValueError(f"output must be 'float', 'uint8' or 'pil', got {output!r}")
        indices = self._check_indices(indices)
        step = batch_size or indices.shape[0]
        out = torch.cat([self.model.decode_indices(indices[i : i + step]) for i in range(0, indices.shape[0], step)]).float()
        if self.is_audio:
            out = out.clamp(-1, 1)
            return out[..., :length] if length is not None else out
        images = ((out + 1) / 2).clamp(0, 1)
        if output == "float":
            return images
        as_uint8 = (images * 255).round().to(torch.uint8)
        if output == "uint8":
            return as_uint8
        from PIL import Image

        arrays = as_uint8.permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a) for a in arrays]

    # ----- files (``simvq encode`` / ``simvq decode``) ---------------------------------------------------
    def encode_files(self, inputs: Sequence[str], out: str | os.PathLike, *, size: int | None = None) -> str:
        """Encode image or audio files (folders expanded) into a token file; returns a summary line."""
        return self.modality.encode_files(self, self.config, list(inputs), Path(out), size=size, device=self.device)

    def check_tokens(self, tokens):
        """A token file (path or :class:`~simvq.tokens.TokenFile`) this tokenizer can decode, every item checked
        (ValueError naming the first problem); returns the loaded file."""
        from simvq.tokens import check_compatible, load_tokens

        if not hasattr(tokens, "tokens"):
            tokens = load_tokens(tokens)
        check_compatible(tokens, self.config, self.codebook_size)
        for i, item in enumerate(tokens.tokens):
            try:
                self._valid_indices(item)
            except (TypeError, ValueError) as err:
                name = tokens.names[i] if i < len(tokens.names) else i
                raise ValueError(f"token file item {i} ({name}): {err}") from None
        return tokens

    def decode_files(self, tokens, out: str | os.PathLike, *, overwrite: bool = False) -> str:
        """Decode a token file (path or :class:`~simvq.tokens.TokenFile`) into files under ``out``; every item is
        checked before anything is written."""
        tokens = self.check_tokens(tokens)
        return self.modality.decode_files(self, self.config, tokens, Path(out), overwrite=overwrite, device=self.device)

    def __repr__(self) -> str:
        rate = f"{self.tokens_per_second:g} tokens/s, {self.bitrate:g} bit/s" if self.is_audio else f"grid {self.grid_shape}"
        return f"Tokenizer({self.modality.name}, K={self.codebook_size}, {rate}, device={self.device}, dtype={self.dtype})"


__all__ = ["HF_CONFIG_FILE", "Tokenizer"]
