"""RecordDataModule and transforms on real .rec files (MXNet fixtures and files written by ours)."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_lightning.utilities.data import _update_dataloader
from torch.utils.data import DataLoader, DistributedSampler

from data.datamodule import (
    RecordDataModule,
    RecordImageDataset,
    collate_images,
    split_holdout,
)
from data.layout import write_property
from data.recordio import IRHeader, RecordIOError, RecordReader, RecordWriter, pack
from data.transforms import ImageDecodeError, decode_image, hflip, normalize, resize
from data.verification import write_bin

# ------------------------------------------------------------------------------ helpers


def _encode(arr: np.ndarray, fmt: str = "JPEG", mode: str | None = None) -> bytes:
    img = Image.fromarray(arr)
    if mode is not None:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _random_image(rng: np.random.Generator, size: int = 16) -> np.ndarray:
    # smooth content so JPEG stays close to the array
    base = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(base).resize((size, size), Image.BILINEAR))


def write_insightface(
    root: Path, payloads: list[bytes], labels: list[int], num_classes: int | None = None
) -> Path:
    """An InsightFace-layout train.rec/.idx/property (images must be grouped by label)."""
    root.mkdir(parents=True, exist_ok=True)
    n = len(payloads)
    num_classes = num_classes if num_classes is not None else (max(labels) + 1 if labels else 0)
    imgnum, totnum = n + 1, n + 1 + num_classes
    with RecordWriter(root / "train.rec", root / "train.idx") as w:
        w.write_idx(0, pack(IRHeader(2, np.array([imgnum, totnum], np.float32), 0, 0), b""))
        for key, (payload, label) in enumerate(zip(payloads, labels, strict=True), start=1):
            w.write_idx(key, pack(IRHeader(0, float(label), key, 0), payload))
        lab = np.asarray(labels)
        for c in range(num_classes):
            keys = np.flatnonzero(lab == c) + 1
            rng_label = np.array([keys.min(), keys.max() + 1] if len(keys) else [1, 1], np.float32)
            w.write_idx(imgnum + c, pack(IRHeader(2, rng_label, imgnum + c, 0), b""))
    if num_classes:
        write_property(root / "property", num_classes, (16, 16))
    return root


@pytest.fixture
def small_rec(tmp_path: Path) -> tuple[Path, list[np.ndarray], list[int]]:
    """6 classes x 4 RGB PNG images (lossless: decoded pixels are known exactly)."""
    rng = np.random.default_rng(0)
    arrays = [_random_image(rng) for _ in range(24)]
    labels = [i // 4 for i in range(24)]
    root = write_insightface(tmp_path / "rec", [_encode(a, "PNG") for a in arrays], labels)
    return root, arrays, labels


# ------------------------------------------------------------------------------ transforms


def test_decode_png_exact_and_modes():
    rng = np.random.default_rng(1)
    arr = _random_image(rng)
    img = decode_image(_encode(arr, "PNG"))
    assert img.dtype == torch.uint8 and img.shape == (3, 16, 16)
    assert torch.equal(img, torch.from_numpy(arr.copy()).permute(2, 0, 1))
    for mode in ("L", "LA", "P", "RGBA", "CMYK"):
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        data = _encode(arr, fmt, mode)
        ref = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
        out = decode_image(data, "x")
        assert out.shape == (3, 16, 16), mode
        assert torch.equal(out, torch.from_numpy(ref).permute(2, 0, 1)), mode
    gray = decode_image(_encode(arr, "JPEG", "L"))
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_decode_jpeg_same_size_is_exact_and_draft_only_shrinks():
    rng = np.random.default_rng(2)
    arr = np.asarray(Image.fromarray(_random_image(rng)).resize((64, 64)))
    data = _encode(arr, "JPEG")
    ref = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB")))
    ref = ref.permute(2, 0, 1)
    assert torch.equal(decode_image(data), ref)
    assert torch.equal(decode_image(data, size=(64, 64)), ref)  # no draft for same-size reads
    small = decode_image(data, size=(32, 32))
    assert small.shape == (3, 32, 32)
    slow = resize(ref, (32, 32))
    assert (small.float() - slow.float()).abs().mean() < 6  # DCT-domain vs pixel-domain shrink
    big = decode_image(data, size=(80, 96))
    assert big.shape == (3, 80, 96)
    png = _encode(arr, "PNG")
    assert (decode_image(png, size=(32, 32)).float() - slow.float()).abs().mean() < 3


@pytest.mark.parametrize("data", [b"", b"not an image at all", None])
def test_undecodable_image_error_names_source(data):
    if data is None:  # a truncated JPEG
        data = _encode(np.zeros((32, 32, 3), np.uint8) + 100, "JPEG")[:40]
    with pytest.raises(ImageDecodeError, match="train.rec key 17"):
        decode_image(data, "train.rec key 17")


def test_normalize_hflip_resize_against_reference():
    x = torch.arange(256, dtype=torch.int64).to(torch.uint8).reshape(1, 1, 16, 16)
    y = normalize(x)
    assert y.dtype == torch.float32
    assert torch.allclose(y, (x.double() - 127.5).div(127.5).float())
    assert y.min() == -1 and y.max() == 1
    img = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    assert torch.equal(hflip(img), torch.from_numpy(img.numpy()[:, :, ::-1].copy()))
    assert resize(img, (5, 7)) is img
    assert resize(img, (10, 14)).shape == (3, 10, 14)
    flat = torch.full((3, 8, 8), 77, dtype=torch.uint8)
    assert torch.equal(resize(flat, (4, 4)), torch.full((3, 4, 4), 77, dtype=torch.uint8))


# ------------------------------------------------------------------------------ datamodule


def test_mxnet_fixture_train_holdout_and_pairs(mxnet_rec_dir: Path):
    expected = json.loads((mxnet_rec_dir / "expected.json").read_text())
    dm = RecordDataModule(
        path=str(mxnet_rec_dir), image_size=112, batch_size=8, val_fraction=0.25, bins=["pairs"]
    )
    dm.prepare_data()
    assert dm.num_classes == expected["num_classes"] == 19  # before setup: from property
    dm.setup("fit")
    assert dm.val_names == ["holdout", "pairs"]
    np.testing.assert_array_equal(
        dm.verification_sets["pairs"].issame, np.array(expected["pairs"]["issame"])
    )
    train, held = dm.train_dataset, dm.holdout_dataset
    keys = {im["key"]: im["label"] for im in expected["images"]}
    assert sorted(train.keys.tolist() + held.keys.tolist()) == sorted(keys)
    assert abs(len(held) - 0.25 * len(keys)) <= 2
    assert set(held.labels.tolist()) <= set(train.labels.tolist())  # closed set
    for ds in (train, held):
        assert [keys[k] for k in ds.keys.tolist()] == ds.labels.tolist()

    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 112, 112) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and -1 <= images.min() and images.max() <= 1
    val_holdout, val_pairs = dm.val_dataloader()
    got = torch.cat([lab for _, lab in val_holdout])
    assert got.tolist() == held.labels.tolist()
    idx = torch.cat([i for _, i in val_pairs])
    assert idx.tolist() == list(range(2 * len(expected["pairs"]["issame"])))
    # the multi-part record decodes like any other
    multi = next(im["key"] for im in expected["images"] if im["multipart"])
    pos = (train.keys == multi).nonzero()[0]
    ds = train if len(pos) else held
    pos = (ds.keys == multi).nonzero()[0][0]
    assert ds[int(pos)][0].shape == (3, 112, 112)


def test_resize_when_image_size_differs(mxnet_rec_dir: Path):
    dm = RecordDataModule(path=str(mxnet_rec_dir), image_size=56, batch_size=4)
    dm.setup("fit")
    images, _ = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 56, 56)


def _canonical(img: torch.Tensor) -> bytes:
    """Same key for an image and its mirror (train batches are randomly flipped)."""
    return min(img.numpy().tobytes(), hflip(img).numpy().tobytes())


def test_zero_and_two_workers_yield_the_same_images(small_rec):
    root, arrays, labels = small_rec
    results = {}
    for workers in (0, 2):
        dm = RecordDataModule(path=str(root), image_size=16, batch_size=5, num_workers=workers)
        dm.setup("fit")
        # keyed, unflipped: same key -> identical tensor
        ds = RecordImageDataset(
            dm.train_dataset.reader, dm.train_dataset.keys, dm.train_dataset.labels, (16, 16)
        )
        loader = DataLoader(ds, batch_size=5, num_workers=workers, collate_fn=collate_images)
        seq = torch.cat([x for x, _ in loader])
        # the shuffled, flipped training loader: the same images up to flips
        torch.manual_seed(0)
        train = [(x, y) for x, y in dm.train_dataloader()]
        flat = sorted(
            (int(y), _canonical(x)) for xs, ys in train for x, y in zip(xs, ys, strict=True)
        )
        results[workers] = (seq, flat)
    assert torch.equal(results[0][0], results[2][0])
    assert results[0][1] == results[2][1]
    ref = torch.stack([normalize(torch.from_numpy(a).permute(2, 0, 1)) for a in arrays])
    assert torch.equal(results[0][0], ref)
    assert len(results[0][1]) == 20  # 24 images, batch 5, last incomplete batch dropped


def test_gray_record_comes_out_rgb(tmp_path: Path):
    rng = np.random.default_rng(3)
    arr = _random_image(rng)
    root = write_insightface(tmp_path, [_encode(arr, "PNG", "L"), _encode(arr, "JPEG")], [0, 1])
    dm = RecordDataModule(path=str(root), image_size=16, batch_size=2)
    dm.setup("fit")
    img, label = dm.train_dataset[0]
    assert img.shape == (3, 16, 16) and label == 0
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])


def _epoch(dm: RecordDataModule) -> list[tuple[int, bytes]]:
    """(label, image bytes) of one training epoch, sorted (the order is shuffled)."""
    return sorted(
        (int(y), x.numpy().tobytes())
        for xs, ys in dm.train_dataloader()
        for x, y in zip(xs, ys, strict=True)
    )


def test_flip_off_gives_the_unflipped_images(small_rec):
    """data.flip=false: an epoch holds exactly the decoded images; with flips it does not."""
    root, arrays, labels = small_rec
    ref = sorted(
        (y, normalize(torch.from_numpy(a.copy()).permute(2, 0, 1)).numpy().tobytes())
        for a, y in zip(arrays, labels, strict=True)
    )
    dm = RecordDataModule(path=str(root), image_size=16, batch_size=6, flip=False)
    dm.setup("fit")
    assert not dm.train_dataset.flip
    assert all(isinstance(i, int) for i in dm.train_dataloader().sampler)  # no flip bits
    for epoch in (0, 1):
        dm.train_dataloader().sampler.set_epoch(epoch)
        assert _epoch(dm) == ref
    flipped = RecordDataModule(path=str(root), image_size=16, batch_size=6)  # default: flip
    flipped.setup("fit")
    assert _epoch(flipped) != ref


def test_one_channel_decodes_grayscale(small_rec):
    """channels=1: (B, 1, H, W) batches of PIL's L conversion, training and .bin loaders."""
    root, arrays, labels = small_rec
    write_bin(root / "pairs.bin", [_encode(a, "PNG") for a in arrays[:4]], [True, False])
    dm = RecordDataModule(
        path=str(root), image_size=16, batch_size=24, channels=1, flip=False, bins=["pairs"]
    )
    dm.setup("fit")
    gray = [np.array(Image.fromarray(a).convert("L")) for a in arrays]
    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape == (24, 1, 16, 16)
    ref = sorted(
        (y, normalize(torch.from_numpy(g)[None]).numpy().tobytes())
        for g, y in zip(gray, labels, strict=True)
    )
    got = [(int(y), x.numpy().tobytes()) for x, y in zip(images, targets, strict=True)]
    assert sorted(got) == ref
    x, _ = next(iter(dm.val_dataloader()[0]))
    assert x.shape == (4, 1, 16, 16)
    assert torch.equal(x[2], normalize(torch.from_numpy(gray[2])[None]))
    jpeg = decode_image(_encode(arrays[0], "JPEG"), size=(8, 8), channels=1)  # draft path
    assert jpeg.shape == (1, 8, 8)
    with pytest.raises(ValueError, match="channels"):
        RecordDataModule(path=str(root), channels=2)


@pytest.mark.parametrize("workers", [0, 2])
def test_undecodable_image_raises_or_is_skipped(tmp_path: Path, workers: int):
    rng = np.random.default_rng(4)
    payloads = [_encode(_random_image(rng), "PNG") for _ in range(8)]
    payloads[5] = b"\xff\xd8 this is not a jpeg"  # key 6
    root = write_insightface(tmp_path, payloads, [0, 0, 0, 0, 1, 1, 1, 1])
    dm = RecordDataModule(path=str(root), image_size=16, batch_size=4, num_workers=workers)
    dm.setup("fit")
    with pytest.raises(ImageDecodeError, match=r"train\.rec key 6"):
        list(dm.train_dataloader())

    dm = RecordDataModule(
        path=str(root), image_size=16, batch_size=4, num_workers=workers, skip_corrupt=True
    )
    dm.setup("fit")
    n = sum(len(y) for _, y in dm.train_dataloader())
    assert dm.skipped_images == 1 and n == 7  # counted in the worker, seen by the main process
    ds = dm.train_dataset
    seen = [ds[i] for i in range(len(ds))]
    assert sum(s is None for s in seen) == 1 and dm.skipped_images == 2


def test_holdout_split_keeps_every_class_in_training():
    labels = np.array([0] * 10 + [1] + [2] * 2 + [3] * 7)
    for seed in range(20):
        train, held = split_holdout(labels, 0.5, seed)
        assert sorted(np.concatenate([train, held]).tolist()) == list(range(len(labels)))
        assert set(labels[train].tolist()) == {0, 1, 2, 3}
        assert 7 <= len(held) <= 10
    train, held = split_holdout(labels, 0.0)
    assert len(held) == 0 and len(train) == len(labels)
    with pytest.raises(ValueError, match="val_fraction"):
        split_holdout(labels, 1.0)


def test_bins_by_name_and_path_and_missing(small_rec, tmp_path: Path):
    root, arrays, _ = small_rec
    imgs = [_encode(a, "PNG") for a in arrays[:4]]
    write_bin(root / "lfw.bin", imgs, [True, False])
    other = tmp_path / "elsewhere" / "agedb_30.bin"
    other.parent.mkdir()
    write_bin(other, imgs[::-1], [False, True])
    dm = RecordDataModule(path=str(root), image_size=16, bins=["lfw", str(other)])
    dm.setup("fit")
    assert dm.val_names == ["lfw", "agedb_30"]
    assert dm.verification_sets["agedb_30"].issame.tolist() == [False, True]
    loaders = dm.val_dataloader()
    x, idx = next(iter(loaders[0]))
    assert x.shape == (4, 3, 16, 16) and idx.tolist() == [0, 1, 2, 3]
    ref = normalize(torch.from_numpy(arrays[1]).permute(2, 0, 1))
    assert torch.equal(x[1], ref)  # validation images are never flipped

    dm = RecordDataModule(path=str(root), image_size=16, bins=["cfp_fp"])
    with pytest.raises(FileNotFoundError, match=r"cfp_fp.*looked for.*cfp_fp\.bin"):
        dm.setup("fit")


def test_dataset_pickles_and_reads_after_unpickling(small_rec):
    root, arrays, _ = small_rec
    dm = RecordDataModule(path=str(root), image_size=16)
    dm.setup("fit")
    ds = dm.train_dataset
    first = ds[3]  # opens the file handle in this process
    clone = pickle.loads(pickle.dumps(ds))
    again = clone[3]
    assert torch.equal(first[0].flip(-1), again[0]) or torch.equal(first[0], again[0])
    assert first[1] == again[1]
    pickle.loads(pickle.dumps(dm.bin_datasets))


def test_empty_dataset_is_a_clear_error(tmp_path: Path):
    root = write_insightface(tmp_path / "a", [], [], num_classes=0)
    dm = RecordDataModule(path=str(root))
    with pytest.raises(RecordIOError, match="empty"):
        dm.setup("fit")
    with pytest.raises(FileNotFoundError, match="train.rec"):
        RecordDataModule(path=str(tmp_path / "nothing")).setup("fit")
    with pytest.raises(ValueError, match="data.path"):
        RecordDataModule()


def test_distributed_sampler_shards_the_training_set(small_rec):
    """What Lightning does with use_distributed_sampler=True: same loader, DistributedSampler."""
    root, _, _ = small_rec
    dm = RecordDataModule(path=str(root), image_size=16, batch_size=4)
    dm.setup("fit")
    loader = dm.train_dataloader()
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(dm.train_dataset, num_replicas=2, rank=rank, shuffle=True)
        shard = _update_dataloader(loader, sampler, mode="fit")
        assert shard.collate_fn is collate_images and shard.drop_last
        seen.append(sum(len(y) for _, y in shard))
        assert list(sampler)  # 12 indices per rank
    assert seen == [12, 12]


def test_reader_is_shared_but_reopened_per_process(small_rec):
    root, _, _ = small_rec
    reader = RecordReader(root / "train.rec")
    ds = RecordImageDataset(reader, np.arange(1, 25), np.repeat(np.arange(6), 4), (16, 16))
    loader = DataLoader(ds, batch_size=24, num_workers=2, collate_fn=collate_images)
    x, y = next(iter(loader))
    assert x.shape == (24, 3, 16, 16) and y.tolist() == np.repeat(np.arange(6), 4).tolist()


def test_lightning_trainer_consumes_train_and_validation_loaders(small_rec):
    import pytorch_lightning as pl

    root, arrays, _ = small_rec
    write_bin(root / "lfw.bin", [_encode(a, "PNG") for a in arrays[:6]], [True, False, True])

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3 * 16 * 16, 6)
            self.val_seen: dict[int, int] = {}

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            self.val_seen[dataloader_idx] = self.val_seen.get(dataloader_idx, 0) + len(batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = RecordDataModule(path=str(root), image_size=16, batch_size=4, val_fraction=0.25,
                          bins=["lfw"], val_batch_size=4)  # fmt: skip
    probe = Probe()
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(probe, datamodule=dm)
    assert dm.val_names == ["holdout", "lfw"]
    assert probe.val_seen == {0: len(dm.holdout_dataset), 1: 6}
