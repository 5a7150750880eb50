"""The audio modality: causal SEANet + Vocos tokenizer, speech data, PESQ/STOI/DNSMOS/V-UV F1, wav files."""

from __future__ import annotations

from pathlib import Path

from simvq.modalities.audio.config import AudioDataConfig, AudioLossConfig, AudioModelConfig, finalize_audio_config
from simvq.modalities.audio.data import build_audio_datasets, decode_audio_tokens, encode_audio_files, list_audio_inputs
from simvq.modalities.audio.metrics import AudioBatchMetrics
from simvq.modalities.audio.model import build_audio_tokenizer, convert_official_state_dict
from simvq.modalities.audio.task import AudioTask
from simvq.modalities.base import Modality, bits_per_token

#: built-in data sets a ``--data`` argument may name
BUILTIN_DATASETS = ("speech",)


class AudioModality(Modality):
    name = "audio"
    task_class = AudioTask

    def sections(self) -> dict:
        return {"model": AudioModelConfig, "loss": AudioLossConfig, "data": AudioDataConfig}

    def finalize_config(self, config: dict) -> dict:
        return finalize_audio_config(config)

    def code_dim(self, config: dict) -> int:
        return int(config["model"]["dimension"])

    def build_model(self, config: dict):
        return build_audio_tokenizer(config["model"], config["quantizer"])

    def build_datasets(self, config: dict):
        return build_audio_datasets(config["data"], seed=config.get("seed", 0))

    def data_changes(self, text: str) -> dict:
        if text in BUILTIN_DATASETS:
            return {"dataset": text}
        return {"dataset": "folder", "path": text, "eval_path": text}

    def eval_dataset(self, config: dict, data):
        return self.build_datasets(config)[1], f"{config['data'].get('dataset')} (evaluation split)"

    def build_metrics(self, config: dict, device):
        return AudioBatchMetrics(sample_rate=config["model"]["sample_rate"], device=device)

    def rate(self, model, config: dict) -> dict:
        bits = bits_per_token(model.quantize)
        return {"tokens_per_second": float(model.tokens_per_second), "bits_per_token": bits,
                "bitrate_bps": float(model.tokens_per_second) * bits}

    def encode_files(self, tok, config: dict, inputs: list[str], out: Path, *, size: int | None, device) -> str:
        files = list_audio_inputs(inputs)
        encode_audio_files(tok, config, files, out)
        return (f"encoded {len(files)} audio file(s) into {out} ({tok.tokens_per_second:g} tokens/s, "
                f"{tok.bitrate / 1000:.3g} kbps)")

    def decode_files(self, tok, config: dict, tokens, out: Path, *, overwrite: bool, device) -> str:
        written = decode_audio_tokens(tok, tokens, out, overwrite=overwrite)
        return f"decoded {len(written)} audio file(s) at {tok.sample_rate} Hz into {out}"

    def is_official(self, state_dict) -> bool:
        return any(k.startswith(("encoder.model.", "decoder.backbone.", "backbone.")) for k in state_dict)

    def convert_official(self, state_dict, use_ema: bool):
        return convert_official_state_dict(state_dict, use_ema)

    def compare(self):
        from simvq.modalities.audio import compare

        return compare

    # ----- token priors (simvq.prior reaches them through these; see simvq.modalities.audio.prior) ---------
    prior_windows = True

    def prior_datasets(self, config: dict, *, frames: int, crops: int = 1):
        """``(training windows, held-out windows)`` of ``frames`` tokens each for a token prior."""
        from simvq.modalities.audio.prior import prior_datasets

        return prior_datasets(config, frames, crops)

    def prior_sample_metrics(self, samples, references, config: dict) -> dict:
        """Mean DNSMOS of decoded prior samples next to held-out windows reconstructed by the tokenizer."""
        from simvq.modalities.audio.prior import prior_sample_metrics

        return prior_sample_metrics(samples, references, int(config["model"]["sample_rate"]))

    def save_prior_samples(self, samples, out: Path, config: dict) -> list[Path]:
        """Write decoded prior samples as ``sample_000.wav ...`` in ``out``."""
        from simvq.modalities.audio.prior import save_prior_samples

        return save_prior_samples(samples, out, int(config["model"]["sample_rate"]))


MODALITY = AudioModality()

__all__ = ["AudioModality", "BUILTIN_DATASETS", "MODALITY"]
