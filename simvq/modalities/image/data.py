"""Image data sets that work offline: built-in photos, Fashion-MNIST, scikit-learn digits, image folders.

Every data set returns float32 tensors ``(C, H, W)`` in ``[-1, 1]``. Training sets take
``(index, augmentation_seed)`` items (see :mod:`simvq.data`) and draw their random crops from that seed;
evaluation sets take plain indices and are deterministic.

- ``photos``: the real colour photographs shipped inside scikit-image and scikit-learn (no download).
  The split is by source photo: ``eval_sources`` are never seen in training. Training draws random
  ``image_size`` crops from each photo shrunk by one of ``scales`` (so a crop covers ``scale`` times more
  of the scene); evaluation tiles the held-out photos at every scale with stride ``eval_stride``.
- ``fashion_mnist``: the IDX ``.gz`` files (Debian ``dataset-fashion-mnist`` installs them under
  ``/usr/share/datasets/fashion-mnist``); 28x28 grey padded with black to ``image_size``. Test split = eval.
- ``digits``: scikit-learn's 1,797 8x8 digits, upsampled to ``image_size`` (tiny, for tests).
- ``folder``: any folder tree of JPEG/PNG/BMP/WebP files (ImageNet layout works): the official transforms,
  resize the short side to ``image_size``, random crop (train) / centre crop (eval), no flip. Unreadable
  files are skipped, counted and reported (a log line, and ``dataset.skipped``).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import os
import struct
import warnings
from pathlib import Path

import numpy as np

from simvq.io import save_file_atomic
import torch
from torch.utils.data import Dataset

log = logging.getLogger("simvq.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

#: colour photographs that scikit-image ships in its wheel (others are fetched with pooch and are left out)
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket")
#: scikit-learn's two sample photos
SKLEARN_PHOTOS = ("china", "flower")


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 ``(H, W)`` or ``(H, W, C)`` -> float32 ``(C, H, W)`` in ``[-1, 1]``."""
    if image.ndim == 2:
        image = image[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(127.5).sub_(1.0)


def _match_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """uint8 ``(H, W[, C])`` -> ``(H, W, channels)`` (grey replicated to RGB, RGB to grey by luma)."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 4:
        image = image[:, :, :3]
    if image.shape[2] == channels:
        return image
    if channels == 3:
        return np.repeat(image[:, :, :1], 3, axis=2)
    luma = image[:, :, :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[:, :, None]


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Anti-aliased bicubic resize of a uint8 ``(H, W, C)`` array with PIL."""
    from PIL import Image

    if image.shape[0] == height and image.shape[1] == width:
        return image
    channels = image.shape[2]
    pil = Image.fromarray(image[:, :, 0] if channels == 1 else image)
    out = np.asarray(pil.resize((width, height), Image.BICUBIC))
    return out[:, :, None] if out.ndim == 2 else out


# ----- built-in photos --------------------------------------------------------------------------------
def available_photos() -> dict[str, np.ndarray]:
    """The built-in colour photos as uint8 ``(H, W, 3)`` arrays, by name (only those that load offline).

    Decoded once per process: ``simvq compare`` builds the data set for many short runs.
    """
    return dict(_load_photos())


@functools.lru_cache(maxsize=1)
def _load_photos() -> dict[str, np.ndarray]:
    photos: dict[str, np.ndarray] = {}
    try:
        import skimage.data as skdata

        for name in SKIMAGE_PHOTOS:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    photos[name] = np.asarray(getattr(skdata, name)())
            except Exception:  # noqa: BLE001 - a photo that needs a download is simply not available
                continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                photos["motorcycle"] = np.asarray(skdata.stereo_motorcycle()[0])  # left view only
        except Exception:  # noqa: BLE001
            pass
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_images

        bunch = load_sample_images()
        for filename, image in zip(bunch.filenames, bunch.images):
            photos[Path(filename).stem] = np.asarray(image)
    except ImportError:
        pass
    out = {}
    for k, v in photos.items():
        if v.ndim == 3 and v.shape[2] >= 3:
            v = np.ascontiguousarray(v[:, :, :3])
            v.setflags(write=False)  # shared by every caller of the cache
            out[k] = v
    return out


class PhotoCrops(Dataset):
    """Random crops of a few photos at several scales (training).

    ``len`` is the number of non-overlapping ``size`` tiles the photos hold at scale 1 (one "epoch");
    item ``i`` picks a photo in proportion to its area, so big photos are sampled more.

    Args:
        photos: name -> uint8 ``(H, W, 3)``.
        size: crop side in pixels.
        scales: shrink factors; a crop at scale ``s`` covers ``s * size`` pixels of the original.
        channels: 1 or 3.
    """

    def __init__(self, photos: dict[str, np.ndarray], *, size: int, scales, channels: int = 3) -> None:
        if not photos:
            raise ValueError("no photos to crop from; check data.eval_sources (it may hold every photo)")
        self.names = sorted(photos)
        self.size = size
        self.scales = [float(s) for s in scales]
        self.pyramids: list[list[np.ndarray]] = []
        tiles = []
        for name in self.names:
            image = _match_channels(photos[name], channels)
            levels = []
            for s in self.scales:
                h, w = round(image.shape[0] / s), round(image.shape[1] / s)
                if min(h, w) < size:
                    continue  # this photo is too small to be seen at this scale
                levels.append(_resize(image, h, w))
            if not levels:
                raise ValueError(f"photo {name!r} ({image.shape[0]}x{image.shape[1]}) is smaller than the crop size {size}")
            self.pyramids.append(levels)
            tiles.append((image.shape[0] // size) * (image.shape[1] // size))
        self.bounds = np.cumsum(tiles)

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def __getitem__(self, item) -> torch.Tensor:
        index, aug_seed = item
        photo = int(np.searchsorted(self.bounds, index, side="right"))
        rng = np.random.default_rng(aug_seed)
        levels = self.pyramids[photo]
        level = levels[int(rng.integers(len(levels)))]
        top = int(rng.integers(level.shape[0] - self.size + 1))
        left = int(rng.integers(level.shape[1] - self.size + 1))
        return to_tensor(level[top : top + self.size, left : left + self.size])


class PhotoTiles(Dataset):
    """Deterministic tiles of photos at several scales (evaluation): every ``stride`` pixels, every scale."""

    def __init__(self, photos: dict[str, np.ndarray], *, size: int, scales, stride: int, channels: int = 3) -> None:
        if not photos:
            raise ValueError("no evaluation photos; data.eval_sources must name at least one available photo")
        self.size = size
        self.levels: list[np.ndarray] = []
        self.tiles: list[tuple[int, int, int]] = []
        for name in sorted(photos):
            image = _match_channels(photos[name], channels)
            for s in scales:
                h, w = round(image.shape[0] / s), round(image.shape[1] / s)
                if min(h, w) < size:
                    continue
                self.levels.append(_resize(image, h, w))
                li = len(self.levels) - 1
                for top in range(0, h - size + 1, stride):
                    for left in range(0, w - size + 1, stride):
                        self.tiles.append((li, top, left))

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> torch.Tensor:
        li, top, left = self.tiles[index]
        return to_tensor(self.levels[li][top : top + self.size, left : left + self.size])


# ----- in-memory arrays (Fashion-MNIST, digits) --------------------------------------------------------
class ArrayImages(Dataset):
    """uint8 images ``(N, H, W[, C])`` held in memory; training items ``(i, seed)``, eval items ``i``."""

    def __init__(self, images: np.ndarray, *, channels: int) -> None:
        self.images = images
        self.channels = channels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item) -> torch.Tensor:
        index = item[0] if isinstance(item, tuple) else item
        return to_tensor(_match_channels(self.images[index], self.channels))


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw), the format of MNIST / Fashion-MNIST, into a numpy array.

    Header: two zero bytes, a type code (0x08 = uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), the number of dimensions, then one big-endian uint32 per dimension.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = data[2], data[3]
    if code not in dtypes:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(dtypes[code])
    count = int(np.prod(shape)) if shape else 1
    offset = 4 + 4 * ndim
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"{path}: expected {count * dtype.itemsize} data bytes for shape {shape}, found {len(data) - offset}")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(folder: Path, split: str) -> Path:
    for name in (f"{split}-images-idx3-ubyte.gz", f"{split}-images-idx3-ubyte", f"{split}-images.idx3-ubyte"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"no {split}-images-idx3-ubyte[.gz] in {folder}; install Debian's dataset-fashion-mnist or point "
        "data.path at a folder holding the Fashion-MNIST IDX files"
    )


def _pad(images: np.ndarray, size: int) -> np.ndarray:
    h, w = images.shape[1:3]
    if size < max(h, w):
        raise ValueError(f"data.image_size ({size}) is smaller than the {h}x{w} images; use image_size >= {max(h, w)}")
    top, left = (size - h) // 2, (size - w) // 2
    pad = [(0, 0), (top, size - h - top), (left, size - w - left)] + [(0, 0)] * (images.ndim - 3)
    return np.pad(images, pad)  # black (0 -> -1) border


def _limit(images: np.ndarray, limit) -> np.ndarray:
    return images if limit is None else images[: int(limit)]


def fashion_mnist(data_cfg: dict) -> tuple[Dataset, Dataset]:
    folder = Path(data_cfg.get("path") or FASHION_MNIST_DIR)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST folder {folder} does not exist; install Debian's dataset-fashion-mnist or set data.path"
        )
    size, channels = data_cfg["image_size"], data_cfg["channels"]
    train = _pad(_limit(read_idx(_find_idx(folder, "train")), data_cfg.get("train_limit")), size)
    test = _pad(_limit(read_idx(_find_idx(folder, "t10k")), data_cfg.get("eval_limit")), size)
    return ArrayImages(train, channels=channels), ArrayImages(test, channels=channels)


def digits(data_cfg: dict) -> tuple[Dataset, Dataset]:
    from sklearn.datasets import load_digits

    raw = load_digits().images  # (1797, 8, 8) floats 0..16
    images = np.clip(np.rint(raw * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    size = data_cfg["image_size"]
    images = np.stack([_resize(im[:, :, None], size, size) for im in images])
    order = np.random.default_rng(0).permutation(len(images))  # fixed split, independent of the run seed
    n_eval = max(1, int(round(len(images) * data_cfg["eval_fraction"])))
    train, test = images[order[n_eval:]], images[order[:n_eval]]
    train, test = _limit(train, data_cfg.get("train_limit")), _limit(test, data_cfg.get("eval_limit"))
    return ArrayImages(train, channels=data_cfg["channels"]), ArrayImages(test, channels=data_cfg["channels"])


# ----- image folders ----------------------------------------------------------------------------------
def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted); clear errors for a missing or empty folder."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"image folder {folder} does not exist; check data.path / data.eval_path")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder; data.path must be a folder of images")
    files = sorted(
        Path(root) / name
        for root, _, names in os.walk(folder, followlinks=True)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")
    )
    if not files:
        raise ValueError(
            f"image folder {folder} contains no images (looked for {', '.join(IMAGE_EXTENSIONS)} recursively)"
        )
    return files


def _readable(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # noqa: BLE001 - any decoder error means the file is unusable
        return False


class ImageFolder(Dataset):
    """Images from files with the official transforms: resize short side, random/centre crop, no flip.

    Training items are ``(index, seed)`` (random crop), evaluation items ``index`` (centre crop).
    Unreadable files are dropped at construction when ``verify`` (the default); a file that still fails to
    decode later is replaced by the next readable one. Both are counted in ``skipped`` and logged.
    """

    def __init__(self, files: list[Path], *, size: int, channels: int = 3, verify: bool = True, name: str = "") -> None:
        self.size = size
        self.channels = channels
        self.skipped: list[str] = []
        if verify:
            good = []
            for f in files:
                if _readable(f):
                    good.append(f)
                else:
                    self.skipped.append(str(f))
            files = good
        if self.skipped:
            log.warning(
                "%s: skipped %d unreadable image(s) of %d (first: %s)",
                name or "image folder", len(self.skipped), len(self.skipped) + len(files), self.skipped[0],
            )
        if not files:
            raise ValueError(f"{name or 'image folder'}: none of the {len(self.skipped)} image files could be read")
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, path: Path) -> np.ndarray:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGB" if self.channels == 3 else "L")
            w, h = im.size
            scale = self.size / min(w, h)
            # resize the short side to `size` (rounded like torchvision's Resize(int))
            nw, nh = (self.size, max(self.size, int(h * scale))) if w <= h else (max(self.size, int(w * scale)), self.size)
            im = im.resize((nw, nh), Image.BICUBIC)
            arr = np.asarray(im)
        return arr[:, :, None] if arr.ndim == 2 else arr

    def __getitem__(self, item) -> torch.Tensor:
        index, seed = item if isinstance(item, tuple) else (item, None)
        for attempt in range(len(self.files)):
            path = self.files[(index + attempt) % len(self.files)]
            try:
                image = self._load(path)
                break
            except Exception as err:  # noqa: BLE001
                if str(path) not in self.skipped:
                    self.skipped.append(str(path))
                    log.warning("skipping unreadable image %s (%s)", path, err)
        else:
            raise ValueError("no readable image left in the folder")
        h, w = image.shape[:2]
        if seed is None:
            top, left = (h - self.size) // 2, (w - self.size) // 2
        else:
            rng = np.random.default_rng(seed)
            top, left = int(rng.integers(h - self.size + 1)), int(rng.integers(w - self.size + 1))
        return to_tensor(image[top : top + self.size, left : left + self.size])


def _is_eval_file(path: Path, root: Path, fraction: float) -> bool:
    # a stable split that does not depend on file order or on which other files exist
    digest = hashlib.sha1(str(path.relative_to(root)).encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def image_folder(data_cfg: dict) -> tuple[Dataset, Dataset]:
    root = Path(data_cfg["path"])
    files = list_images(root)
    if data_cfg.get("eval_path"):
        train_files, eval_files = files, list_images(data_cfg["eval_path"])
    else:
        eval_files = [f for f in files if _is_eval_file(f, root, data_cfg["eval_fraction"])]
        train_files = [f for f in files if not _is_eval_file(f, root, data_cfg["eval_fraction"])]
        if not eval_files or not train_files:
            raise ValueError(
                f"{root} holds {len(files)} image(s): too few to split with eval_fraction={data_cfg['eval_fraction']}; "
                "add images or set data.eval_path"
            )
    if data_cfg.get("train_limit") is not None:
        train_files = train_files[: data_cfg["train_limit"]]
    if data_cfg.get("eval_limit") is not None:
        eval_files = eval_files[: data_cfg["eval_limit"]]
    kw = dict(size=data_cfg["image_size"], channels=data_cfg["channels"], verify=data_cfg["verify_images"])
    return ImageFolder(train_files, name=f"{root} (train)", **kw), ImageFolder(eval_files, name="evaluation folder", **kw)


def photos(data_cfg: dict) -> tuple[Dataset, Dataset]:
    images = available_photos()
    sources = list(data_cfg.get("eval_sources") or [])
    missing = [s for s in sources if s not in images]
    if missing:
        raise ValueError(f"data.eval_sources names unavailable photo(s) {missing}; available: {sorted(images)}")
    size = data_cfg["image_size"]
    stride = data_cfg.get("eval_stride") or max(1, size // 2)
    train_photos = {k: v for k, v in images.items() if k not in sources}
    eval_photos = {k: v for k, v in images.items() if k in sources}
    train = PhotoCrops(train_photos, size=size, scales=data_cfg["scales"], channels=data_cfg["channels"])
    test = PhotoTiles(eval_photos, size=size, scales=data_cfg["scales"], stride=stride, channels=data_cfg["channels"])
    if data_cfg.get("eval_limit") is not None and data_cfg["eval_limit"] < len(test.tiles):
        # keep an even spread over photos and scales rather than the first tiles of one photo
        keep = np.linspace(0, len(test.tiles) - 1, int(data_cfg["eval_limit"])).round().astype(int)
        test.tiles = [test.tiles[i] for i in keep]
    return train, test


def build_image_datasets(data_cfg: dict, *, seed: int = 0) -> tuple[Dataset, Dataset]:
    """``(train, eval)`` image data sets for a validated ``data`` config section."""
    kind = data_cfg.get("dataset", "photos")
    builders = {"photos": photos, "fashion_mnist": fashion_mnist, "digits": digits, "folder": image_folder}
    if kind not in builders:
        raise ValueError(f"unknown data.dataset {kind!r}; choose one of {sorted(builders)}")
    return builders[kind](data_cfg)


def load_image_file(path: str | Path, *, channels: int = 3, size: int | None = None) -> torch.Tensor:
    """One image file -> ``(C, H, W)`` in ``[-1, 1]`` (optionally short side resized + centre-cropped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"size (--size) must be a positive integer, got {size!r}")
    if size is not None:
        return ImageFolder([path], size=size, channels=channels, verify=False)[0]
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB" if channels == 3 else "L"))
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"cannot read image {path}: {err}") from err
    return to_tensor(arr)


def save_image_file(image: torch.Tensor, path: str | Path) -> None:
    """``(C, H, W)`` in ``[-1, 1]`` -> an 8-bit PNG/JPEG at ``path`` (clamped, rounded)."""
    from PIL import Image

    arr = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    arr = arr.transpose(1, 2, 0)
    image_file = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())  # the temporary name has no telling suffix
    if fmt is None:
        raise ValueError(f"cannot tell the image format of {path}; use a .png or .jpg name")
    save_file_atomic(path, lambda tmp: image_file.save(tmp, format=fmt))


__all__ = [
    "ArrayImages",
    "ImageFolder",
    "PhotoCrops",
    "PhotoTiles",
    "available_photos",
    "build_image_datasets",
    "list_images",
    "load_image_file",
    "read_idx",
    "save_image_file",
    "to_tensor",
]
