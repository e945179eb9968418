"""Demo data: deterministic, valid InsightFace layout, balanced pairs with hard negatives."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest

from data.datamodule import RecordDataModule
from data.demo import (
    DemoParams,
    _make_pairs,
    demo_dir,
    ensure_demo,
    render_faces,
    sample_identities,
)
from data.layout import read_layout
from data.recordio import RecordReader, unpack
from data.transforms import decode_image
from data.verification import load_bin

SMALL = dict(num_classes=24, images_per_class=3, num_unseen=16, images_per_unseen=3, num_pairs=40)
FILES = ("train.rec", "train.idx", "property", "pairs.bin", "demo.json")


def test_same_seed_gives_byte_identical_files(tmp_path: Path):
    a = ensure_demo(tmp_path / "a", **SMALL)
    b = ensure_demo(tmp_path / "b", **SMALL)
    assert a.name == b.name  # the hash depends on params only
    for f in FILES:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    c = ensure_demo(tmp_path / "a", **SMALL, seed=1)
    assert c != a
    assert (c / "train.rec").read_bytes() != (a / "train.rec").read_bytes()


def test_layout_and_pairs_are_valid(tmp_path: Path):
    root = ensure_demo(tmp_path, **SMALL)
    assert sorted(p.name for p in root.iterdir()) == sorted(FILES)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temp dirs left
    reader = RecordReader(root / "train.rec")
    layout = read_layout(reader)
    assert layout.kind == "insightface" and layout.num_classes == 24
    assert layout.image_size == (32, 32)
    np.testing.assert_array_equal(layout.labels, np.repeat(np.arange(24), 3))
    assert len(layout.identity_ranges) == 24
    assert layout.identity_ranges[int(layout.image_keys[-1]) + 1] == (1, 4)
    header, payload = unpack(reader.read_idx(5))
    img = decode_image(payload, "demo key 5")
    assert img.shape == (3, 32, 32) and payload[:2] == b"\xff\xd8"  # JPEG

    pairs = load_bin(root / "pairs.bin")
    assert len(pairs.issame) == 40 and len(pairs.images) == 80
    assert pairs.issame.sum() == 20
    assert decode_image(pairs.images[0]).shape == (3, 32, 32)


def test_negative_pairs_are_half_hard():
    p = DemoParams(num_pairs=400, num_unseen=64)
    rng = np.random.default_rng(0)
    family = np.arange(64) // 8
    pairs, issame = _make_pairs(rng, family, 5, p)
    ident = pairs // 5
    assert issame.sum() == 200
    assert np.all(ident[issame, 0] == ident[issame, 1])
    assert np.all(pairs[issame, 0] != pairs[issame, 1])  # two different images
    neg = ident[~issame]
    assert np.all(neg[:, 0] != neg[:, 1])
    hard = family[neg[:, 0]] == family[neg[:, 1]]
    assert hard.mean() >= 0.5
    assert issame[:100].any() and (~issame[:100]).any()  # shuffled: every fold sees both


def test_families_are_look_alikes():
    """Canonical renders: family members closer to each other than to other families."""
    rng = np.random.default_rng(0)
    params, family = sample_identities(rng, 64, 8, 0.07)
    imgs = render_faces(params, rng, 32, jitter=False).reshape(64, -1).astype(np.float32)
    d = np.sqrt(((imgs[:, None] - imgs[None]) ** 2).mean(-1))
    same_family = family[:, None] == family[None]
    off_diag = ~np.eye(64, dtype=bool)
    within = d[same_family & off_diag].mean()
    across = d[~same_family].mean()
    assert within < 0.5 * across
    assert d[off_diag].min() > 1.0  # but no two identities render alike


def test_ensure_demo_is_idempotent_and_checks_params(tmp_path: Path):
    a = ensure_demo(tmp_path, **SMALL)
    mtime = (a / "train.rec").stat().st_mtime_ns
    assert ensure_demo(tmp_path, **SMALL) == a == demo_dir(tmp_path, **SMALL)
    assert (a / "train.rec").stat().st_mtime_ns == mtime
    with pytest.raises(TypeError, match="unknown demo parameter"):
        ensure_demo(tmp_path, num_clases=3)


def _race(root: str, queue) -> None:
    queue.put(str(ensure_demo(root, **SMALL)))


def test_concurrent_processes_agree(tmp_path: Path):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = {queue.get(timeout=120) for _ in procs}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(results) == 1
    root = Path(results.pop())
    assert all((root / f).is_file() for f in FILES)
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [root.name]


def test_datamodule_demo(tmp_path: Path):
    dm = RecordDataModule(demo=True, image_size=32, batch_size=16, bins=["pairs"],
                          demo_kwargs={"root": str(tmp_path), **SMALL})  # fmt: skip
    dm.prepare_data()
    assert dm.num_classes == 24
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and y.max() < 24
    assert dm.val_names == ["pairs"] and len(dm.verification_sets["pairs"].issame) == 40


@pytest.mark.slow
def test_demo_is_learnable():
    """~60 s of a small CNN + CosFace full softmax on 2 cores: pairs accuracy far above chance."""
    import time

    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(0)
    dm = RecordDataModule(demo=True, image_size=32, batch_size=128, bins=["pairs"])
    dm.prepare_data()
    dm.setup("fit")

    def block(i: int, o: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()
        )

    net = nn.Sequential(
        block(3, 32), nn.MaxPool2d(2), block(32, 64), nn.MaxPool2d(2), block(64, 128),
        nn.MaxPool2d(2), block(128, 128), nn.Flatten(), nn.Linear(128 * 16, 128),
        nn.BatchNorm1d(128),
    )  # fmt: skip
    weight = nn.Parameter(torch.randn(dm.num_classes, 128) * 0.01)
    opt = torch.optim.SGD([*net.parameters(), weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
    start = time.perf_counter()
    while time.perf_counter() - start < 60:
        for x, y in dm.train_dataloader():
            cos = F.normalize(net(x)) @ F.normalize(weight).t()
            loss = F.cross_entropy(30.0 * (cos - 0.35 * F.one_hot(y, dm.num_classes)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if time.perf_counter() - start > 60:
                break
    net.eval()
    with torch.no_grad():
        emb = torch.cat([F.normalize(net(x)) for x, _ in dm.val_dataloader()[0]]).numpy()
    sim = (emb[0::2] * emb[1::2]).sum(1)
    issame = dm.verification_sets["pairs"].issame
    acc = max(((sim >= t) == issame).mean() for t in sim)
    assert acc > 0.65, acc


@pytest.mark.timeout(60)
@pytest.mark.parametrize("family_size", [8, 1])
def test_pairs_from_a_single_family_or_only_singletons(tmp_path: Path, family_size: int):
    """Too few unseen identities for two families (or families of one) still finish."""
    out = ensure_demo(
        tmp_path, num_classes=16, images_per_class=4, num_pairs=8, num_unseen=3,
        images_per_unseen=2, family_size=family_size,
    )  # fmt: skip
    vs = load_bin(out / "pairs.bin")
    assert len(vs.issame) == 8 and vs.issame.sum() == 4
