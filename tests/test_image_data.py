"""Image data: IDX reader, Fashion-MNIST padding, image folders (errors, corrupt files, transforms),
the built-in photos split, and the resumable step-indexed sampler."""

import gzip
import logging
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from simvq.data import StepBatchSampler, eval_loader
from simvq.modalities.image.data import ImageFolder, build_image_datasets, list_images, read_idx


def _write_idx(path, array, code=0x08):
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    dt = {0x08: ">u1", 0x0B: ">i2"}[code]
    data = header + array.astype(dt).tobytes()
    (gzip.open if str(path).endswith(".gz") else open)(path, "wb").write(data)


def test_read_idx_matches_the_bytes(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", a)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), a)
    b = np.array([[-300, 7], [12, 40000 - 65536]], dtype=np.int16)
    _write_idx(tmp_path / "b", b, code=0x0B)
    assert np.array_equal(read_idx(tmp_path / "b"), b)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00")
    with pytest.raises(ValueError, match="expected 10 data bytes"):
        read_idx(tmp_path / "short")


def _data_cfg(**kw):
    cfg = {"dataset": "folder", "path": None, "eval_path": None, "image_size": 32, "channels": 3,
           "scales": [1.0], "eval_sources": [], "eval_stride": None, "eval_fraction": 0.25, "train_limit": None,
           "eval_limit": None, "batch_size": 4, "eval_batch_size": 4, "num_workers": 0, "verify_images": True}
    cfg.update(kw)
    return cfg


def test_fashion_mnist_is_padded_with_black(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", train)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test)
    tr, ev = build_image_datasets(_data_cfg(dataset="fashion_mnist", path=str(tmp_path), channels=1))
    assert len(tr) == 5 and len(ev) == 3
    x = tr[(2, 123)]
    assert x.shape == (1, 32, 32)
    # centre 28x28 holds the pixels scaled to [-1, 1]; the 2-pixel border is black (-1)
    assert torch.allclose(x[0, 2:30, 2:30], torch.from_numpy(train[2]).float() / 127.5 - 1)
    assert torch.all(x[0, :2] == -1) and torch.all(x[0, :, 30:] == -1)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        build_image_datasets(_data_cfg(dataset="fashion_mnist", path=str(tmp_path / "missing"), channels=1))


def _save(path, size, color=(200, 30, 60)):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[..., 0] = np.arange(size[0], dtype=np.uint8)[None, :] * 3
    arr[..., 1] = color[1]
    arr[..., 2] = np.arange(size[1], dtype=np.uint8)[:, None]
    Image.fromarray(arr).save(path)
    return arr


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "nowhere")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    with pytest.raises(ValueError, match="contains no images"):
        list_images(tmp_path / "empty")


def test_corrupt_images_are_skipped_counted_and_reported(tmp_path, caplog):
    for i in range(3):
        _save(tmp_path / "class_a" / f"{i}.png", (40, 48))
    (tmp_path / "class_b").mkdir()
    (tmp_path / "class_b" / "broken.jpg").write_bytes(b"this is not a jpeg")
    (tmp_path / "class_b" / "empty.png").write_bytes(b"")
    files = list_images(tmp_path)
    assert len(files) == 5  # nested folders are searched
    with caplog.at_level(logging.WARNING, logger="simvq.data"):
        ds = ImageFolder(files, size=32, name="toy")
    assert len(ds) == 3 and len(ds.skipped) == 2
    assert any("skipped 2 unreadable image(s) of 5" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="none of the 2 image files could be read"):
        ImageFolder([tmp_path / "class_b" / "broken.jpg", tmp_path / "class_b" / "empty.png"], size=32)


def test_folder_transforms_resize_short_side_and_crop(tmp_path):
    arr = _save(tmp_path / "img.png", (60, 40))  # width 60, height 40
    ds = ImageFolder([tmp_path / "img.png"], size=20)
    # reference: PIL bicubic resize of the short side to 20 (-> 30x20), centre crop 20x20
    ref = np.asarray(Image.fromarray(arr).resize((30, 20), Image.BICUBIC))[:, 5:25]
    x = ds[0]
    assert x.shape == (3, 20, 20) and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x, torch.from_numpy(ref.copy()).permute(2, 0, 1).float() / 127.5 - 1)
    # a random training crop is a 20x20 window of the same resized image, fixed by the sample seed
    full = torch.from_numpy(np.array(Image.fromarray(arr).resize((30, 20), Image.BICUBIC))).permute(2, 0, 1).float() / 127.5 - 1
    crop = ds[(0, 99)]
    assert torch.equal(crop, ds[(0, 99)])
    assert any(torch.allclose(crop, full[:, :, left : left + 20]) for left in range(11))


def test_folder_split_is_by_file_and_stable(tmp_path):
    for i in range(40):
        _save(tmp_path / f"{i:02d}.png", (32, 32))
    tr, ev = build_image_datasets(_data_cfg(path=str(tmp_path)))
    train_names = {p.name for p in tr.files}
    eval_names = {p.name for p in ev.files}
    assert not train_names & eval_names and len(train_names | eval_names) == 40 and 0 < len(eval_names) < 40
    tr2, ev2 = build_image_datasets(_data_cfg(path=str(tmp_path)))
    assert [p.name for p in ev2.files] == [p.name for p in ev.files]


def test_photos_split_by_source_photo_and_deterministic_eval():
    cfg = _data_cfg(dataset="photos", scales=[1.0, 2.0], eval_sources=["chelsea", "flower"], eval_limit=200)
    tr, ev = build_image_datasets(cfg)
    assert "chelsea" not in tr.names and "flower" not in tr.names and "astronaut" in tr.names
    assert len(ev) == 200
    _, ev2 = build_image_datasets(cfg)
    assert torch.equal(ev[17], ev2[17])
    x = tr[(5, 1234)]
    assert x.shape == (3, 32, 32) and torch.equal(x, tr[(5, 1234)]) and -1 <= x.min() and x.max() <= 1
    with pytest.raises(ValueError, match="available"):
        build_image_datasets(_data_cfg(dataset="photos", eval_sources=["lena"]))


def test_step_sampler_is_resumable_sharded_and_covers_each_epoch():
    full = StepBatchSampler(num_items=10, batch_size=4, seed=3)
    it = iter(full)
    batches = [next(it) for _ in range(6)]
    # resuming at step 4 yields exactly the batches an uninterrupted sampler yields from step 4 on
    resumed = iter(StepBatchSampler(num_items=10, batch_size=4, seed=3, start_step=4))
    assert [next(resumed) for _ in range(2)] == batches[4:]
    # the first 20 samples (= 2 epochs of 10) visit every item exactly twice
    items = [i for b in batches for i, _ in b][:20]
    assert sorted(items) == sorted(list(range(10)) * 2)
    # two ranks with batch 2 read the same global batch as one rank with batch 4, disjointly
    r0 = StepBatchSampler(num_items=10, batch_size=2, seed=3, rank=0, world_size=2)
    r1 = StepBatchSampler(num_items=10, batch_size=2, seed=3, rank=1, world_size=2)
    for step in range(5):
        assert r0.batch(step) + r1.batch(step) == full.batch(step)
    # every sample gets its own augmentation seed
    seeds = [s for b in batches for _, s in b]
    assert len(set(seeds)) == len(seeds)


def test_eval_loader_shards_without_repeats():
    ds = torch.utils.data.TensorDataset(torch.arange(11).float())
    seen = []
    for rank in range(3):
        for (batch,) in eval_loader(ds, batch_size=2, rank=rank, world_size=3):
            seen.extend(batch.int().tolist())
    assert sorted(seen) == list(range(11))
