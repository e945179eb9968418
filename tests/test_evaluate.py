"""evaluate.py end to end on a checkpoint from a real tiny train.py run, plus bad inputs."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import evaluate as ev
from data.verification import VerificationFormatError, load_bin
from tests.conftest import MXNET_REC, REPO, TINY_DEMO

DEMO = TINY_DEMO


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def _demo_overrides(root: Path) -> list[str]:
    # ++: add or override each key, whatever data.demo_kwargs holds by default
    return [f"++data.demo_kwargs.{k}={v}" for k, v in {**DEMO, "root": str(root)}.items()]


def _train(tmp: Path, *extra: str) -> dict:
    """train.py's fast_dev_run on a tiny demo with a held-out split -> its checkpoint."""
    import train

    demo_root = tmp / "demo"
    run = tmp / "run"
    cfg = _compose(
        "train",
        [
            f"paths.output_dir={run}",
            f"paths.runs_dir={run}",
            "logger=none",
            "trainer.fast_dev_run=2",
            "data.batch_size=16",
            "data.val_fraction=0.2",
            "sampler.num=24",
            *_demo_overrides(demo_root),
            *extra,
        ],
    )
    train.train(cfg)
    ckpts = sorted(run.glob("**/*.ckpt"))
    assert ckpts, f"train.py wrote no checkpoint under {run}"
    from data.demo import demo_dir

    return {
        "ckpt": ckpts[-1],
        "demo_root": demo_root,
        "demo_dir": demo_dir(demo_root, **DEMO),
        "cfg": cfg,
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A real checkpoint (RGB, random flips)."""
    return _train(tmp_path_factory.mktemp("evaluate"))


@pytest.fixture(scope="module")
def trained_gray(tmp_path_factory) -> dict:
    """A real grayscale checkpoint without flips: model.in_channels=1, data.flip=false."""
    tmp = tmp_path_factory.mktemp("evaluate_gray")
    return _train(tmp, "model.in_channels=1", "data.flip=false")


def _eval_cfg(trained: dict, out: Path, *extra: str):
    return _compose(
        "evaluate",
        [
            f"ckpt={trained['ckpt']}",
            f"out_dir={out}",
            f"paths.output_dir={out}",
            "logger=none",
            "batch_size=32",
            *_demo_overrides(trained["demo_root"]),
            *extra,
        ],
    )


def test_end_to_end_outputs(trained, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    summary = ev.evaluate(_eval_cfg(trained, out, "export.onnx=true"))
    printed = capsys.readouterr().out
    assert "acc %" in printed and "TAR@1e-3" in printed and "pairs" in printed
    assert "params" in printed and "GMACs" in printed

    m = summary["sets"]["pairs"]
    for key in ("acc", "acc_std", "threshold", "tar@far=1e-3", "tar@far=1e-4", "auc"):
        assert np.isfinite(m[key]), key
    assert json.loads((out / "metrics.json").read_text())["sets"]["pairs"]["acc"] == m["acc"]
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("set,pairs,acc")
    assert (out / "roc_pairs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # features: (2P, D) unit rows in .bin order; the metrics recomputed from them agree
    feats = np.load(out / "features" / "pairs.npy")
    issame = np.load(out / "features" / "pairs_issame.npy")
    assert feats.shape == (2 * DEMO["num_pairs"], 128) and len(issame) == DEMO["num_pairs"]
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    from hf_softmax.metrics import verification_metrics

    assert verification_metrics(feats[0::2], feats[1::2], issame)["acc"] == m["acc"]

    # flip TTA by hand: normalise(f(x) + f(flip x)) for the first image
    loaded = ev.load_checkpoint(trained["ckpt"])
    from data.transforms import decode_image, normalize, resize

    vs = load_bin(trained["demo_dir"] / "pairs.bin")
    x = normalize(resize(decode_image(vs.images[0]), (32, 32)))[None]
    with torch.no_grad():
        e = loaded.backbone(torch.cat([x, x.flip(-1)])).sum(0)
    np.testing.assert_allclose(feats[0], (e / e.norm()).numpy(), atol=1e-5)

    assert summary["onnx"]["checked"] and summary["onnx"]["max_abs_diff"] < 1e-4
    assert (out / "tiny.onnx").is_file()


def test_onnx_dynamic_batch(trained, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    loaded = ev.load_checkpoint(trained["ckpt"])
    path = tmp_path / "m.onnx"
    ev.export_onnx(loaded.backbone, 32, path, 17, torch.randn(3, 3, 32, 32))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        got = session.run(None, {"images": x.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, loaded.backbone(x).numpy(), atol=1e-4)


def test_python2_fixture_bin(trained, tmp_path) -> None:
    """InsightFace-style py2 pickle with 112x112 JPEGs; the 32x32 model gets resized images."""
    summary = ev.evaluate(_eval_cfg(trained, tmp_path, f"bins=[{MXNET_REC / 'pairs.bin'}]"))
    assert set(summary["sets"]) == {"pairs"}
    assert summary["sets"]["pairs"]["path"] == str(MXNET_REC / "pairs.bin")
    assert np.load(tmp_path / "features" / "pairs.npy").shape == (20, 128)


def test_closed_set_top1_matches_classifier_predict(trained, tmp_path) -> None:
    """data=rec: chunked argmax over memory-mapped rows == SampledClassifier.predict."""
    from data.datamodule import RecordDataModule
    from hf_softmax.build import build_module

    cfg = _eval_cfg(
        trained,
        tmp_path,
        "data=rec",
        f"data.path={trained['demo_dir']}",
        "top1_chunk_size=7",
        "bins=[pairs]",
        "data.num_workers=0",
        "data.pin_memory=false",
    )
    summary = ev.evaluate(cfg)
    top1 = summary["top1"]
    assert top1["classes"] == DEMO["num_classes"] and top1["images"] > 0

    ckpt = torch.load(trained["ckpt"], map_location="cpu", weights_only=False)
    module = build_module(ckpt["hyper_parameters"]["cfg"], DEMO["num_classes"]).eval()
    module.load_state_dict(ckpt["state_dict"], strict=False)
    train_data = ckpt["hyper_parameters"]["cfg"]["data"]
    dm = RecordDataModule(
        path=str(trained["demo_dir"]),
        image_size=32,
        val_fraction=train_data["val_fraction"],
        seed=train_data.get("seed", 0),
    )
    dm.setup("validate")
    correct = total = 0
    with torch.no_grad():
        for images, labels in dm.val_dataloader()[0]:
            f = module.backbone(images) + module.backbone(images.flip(-1))
            correct += int((module.classifier.predict(f) == labels).sum())
            total += len(labels)
    assert total == top1["images"]
    assert top1["top1"] == pytest.approx(correct / total)


def test_sharded_checkpoint_keys_tolerated(trained, tmp_path) -> None:
    """Wrapper prefixes and foreign classifier keys (a DDP/sharded run) load; bad backbone keys
    are errors that list them."""
    ckpt = torch.load(trained["ckpt"], map_location="cpu", weights_only=False)
    sd = {}
    for k, v in ckpt["state_dict"].items():
        if k.startswith("classifier."):
            sd["_forward_module." + k.replace("classifier.", "classifier.shard0.")] = (
                v[:3] if v.dim() else v
            )
        else:
            sd["_forward_module." + k] = v
    ckpt["state_dict"] = sd
    path = tmp_path / "sharded.ckpt"
    torch.save(ckpt, path)
    ref = ev.load_checkpoint(trained["ckpt"]).backbone.state_dict()
    got = ev.load_checkpoint(path).backbone.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)

    del sd["_forward_module.backbone.fc.weight"]
    sd["_forward_module.backbone.extra.weight"] = torch.zeros(1)
    torch.save(ckpt, path)
    with pytest.raises(ev.EvaluateError, match=r"missing from checkpoint: fc\.weight(.|\n)*extra"):
        ev.load_checkpoint(path)


def test_checkpoint_of_another_backbone(trained, tmp_path) -> None:
    with pytest.raises(ev.EvaluateError, match="another backbone"):
        ev.evaluate(_eval_cfg(trained, tmp_path, "model=iresnet18"))
    ckpt = torch.load(trained["ckpt"], map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"]["cfg"]["model"]["embedding_dim"] = 64  # says 64, weights are 128
    path = tmp_path / "other.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(ev.EvaluateError, match=r"shape(.|\n)*fc\.weight \(128, 2048\) vs \(64"):
        ev.load_checkpoint(path)


def test_bad_inputs(trained, tmp_path) -> None:
    with pytest.raises(ev.EvaluateError, match="checkpoint not found"):
        ev.load_checkpoint(tmp_path / "nope.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ev.EvaluateError, match="not a torch checkpoint"):
        ev.load_checkpoint(junk)

    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(VerificationFormatError, match="bad.bin"):
        ev.evaluate(_eval_cfg(trained, tmp_path / "o1", f"bins=[{bad}]"))

    odd = tmp_path / "odd.bin"
    images = load_bin(MXNET_REC / "pairs.bin").images
    with open(odd, "wb") as f:
        pickle.dump((images[:3], [True]), f)
    with pytest.raises(VerificationFormatError, match="even number"):
        ev.evaluate(_eval_cfg(trained, tmp_path / "o2", f"bins=[{odd}]"))

    with pytest.raises(ev.EvaluateError, match=r"'lfw' not found; looked for: .*lfw\.bin"):
        ev.evaluate(_eval_cfg(trained, tmp_path / "o3", "bins=[lfw]"))
    with pytest.raises(ev.EvaluateError, match="not found"):
        ev.evaluate(_eval_cfg(trained, tmp_path / "o4", f"bins=[{tmp_path / 'missing.bin'}]"))
    with pytest.raises(ev.EvaluateError, match="needs data.path"):
        ev.evaluate(_eval_cfg(trained, tmp_path / "o5", "data=rec"))


def test_cli(trained, tmp_path) -> None:
    """The real `python evaluate.py` (Hydra main): outputs in the run dir, wandb offline."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    run = tmp_path / "run"
    args = [sys.executable, "evaluate.py", f"ckpt={trained['ckpt']}", f"hydra.run.dir={run}"]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "acc %" in proc.stdout and "GMACs" in proc.stdout
    assert (run / "metrics.json").is_file() and (run / "roc_pairs.png").is_file()
    assert list((run / "wandb").glob("offline-run-*")), "wandb offline run not written"


def test_main_exits_with_message(tmp_path, capsys) -> None:
    """A bad input ends `main` with exit status 2 and a one-line message, no traceback."""
    cfg = _compose("evaluate", [f"ckpt={tmp_path / 'nope.ckpt'}", f"out_dir={tmp_path}"])
    with pytest.raises(SystemExit) as exc:
        ev.main.__wrapped__(cfg)
    assert exc.value.code == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_classifier_rows_not_read_into_memory(trained, tmp_path) -> None:
    """mmap: a checkpoint with a big classifier loads its backbone without reading W."""
    if not Path("/proc/self/statm").is_file():
        pytest.skip("needs /proc to measure resident memory")
    ckpt = torch.load(trained["ckpt"], map_location="cpu", weights_only=False)
    n = 200_000  # 2 x 98 MiB of rows
    ckpt["state_dict"]["classifier.weight"] = torch.ones(n, 128)
    ckpt["state_dict"]["classifier.momentum"] = torch.ones(n, 128)
    path = tmp_path / "big.ckpt"
    torch.save(ckpt, path)
    del ckpt

    def rss_mib() -> float:
        return (
            int(Path("/proc/self/statm").read_text().split()[1])
            * os.sysconf("SC_PAGE_SIZE")
            / 2**20
        )

    before = rss_mib()
    loaded = ev.load_checkpoint(path)
    assert rss_mib() - before < 50  # vs 195 MiB of classifier rows on disk
    assert loaded.state_dict["classifier.weight"].shape == (n, 128)


# ---------------------------------------------------------------------------------------------
# closed-set top-1 / top-5 on a labelled .rec (top1_rec) and grayscale checkpoints


def _write_rec(path: Path, labels: list[int], size: int = 32, seed: int = 0) -> list[bytes]:
    """A plain-layout .rec/.idx (key i = image i, label = labels[i]) of random PNG images."""
    from PIL import Image

    from data.recordio import IRHeader, RecordWriter, pack

    rng = np.random.default_rng(seed)
    pngs = []
    path.parent.mkdir(parents=True, exist_ok=True)
    with RecordWriter(path, path.with_suffix(".idx")) as w:
        for key, label in enumerate(labels):
            small = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(small).resize((size, size), Image.BILINEAR).save(buf, format="PNG")
            pngs.append(buf.getvalue())
            w.write_idx(key, pack(IRHeader(0, float(label), key, 0), pngs[-1]))
    return pngs


def _dense_reference(ckpt_path: Path, pngs: list[bytes], flip: bool, channels: int = 3):
    """Slow oracle: the whole (n, N) plain-logit matrix -> (top-1 ids (n,), top-5 ids (n, 5))."""
    from data.transforms import decode_image, normalize
    from hf_softmax.build import build_module

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    module = build_module(ckpt["hyper_parameters"]["cfg"], DEMO["num_classes"]).eval()
    module.load_state_dict(ckpt["state_dict"], strict=False)
    x = normalize(torch.stack([decode_image(p, channels=channels) for p in pngs]))
    with torch.no_grad():
        f = module.backbone(x) + (module.backbone(x.flip(-1)) if flip else 0)
        logits = module.classifier.head.plain_logits(f, module.classifier.weight)  # (n, N)
    return logits.argmax(1), logits.topk(5, dim=1).indices


def test_top1_rec_matches_dense_reference(trained, tmp_path) -> None:
    """top1_rec (a dir with test.rec, and a .rec file): top-1/top-5 over all N rows, chunked,
    == argmax/topk of the dense logits; per-class CSV; metrics.json/metrics.csv keys."""
    n = DEMO["num_classes"]
    labels = [int(c) for c in np.random.default_rng(1).integers(0, n, 30)]
    pngs = _write_rec(tmp_path / "glyphs" / "test.rec", labels)
    _write_rec(tmp_path / "more" / "extra.rec", [0, 1, n - 1], seed=2)
    out = tmp_path / "out"
    recs = f"top1_rec=[{tmp_path / 'glyphs'},{tmp_path / 'more' / 'extra.rec'}]"
    summary = ev.evaluate(_eval_cfg(trained, out, recs, "top1_chunk_size=7"))
    assert summary["flip"] is True  # the checkpoint trained with data.flip=true

    top1, top5 = _dense_reference(trained["ckpt"], pngs, flip=True)
    y = torch.tensor(labels)
    hit1, hit5 = (top1 == y).numpy(), (top5 == y[:, None]).any(1).numpy()
    res = summary["closed_set"]["test"]
    assert res["images"] == 30 and res["classes"] == n
    assert res["top1"] == pytest.approx(hit1.mean())
    assert res["top5"] == pytest.approx(hit5.mean())
    assert set(summary["closed_set"]) == {"test", "extra"}

    rows = list(csv.DictReader(open(out / "per_class_test.csv")))
    assert list(rows[0]) == ["class", "images", "top1_correct", "top5_correct"]
    want = {}
    for c, a, b in zip(labels, hit1, hit5, strict=True):
        counts = want.setdefault(c, [0, 0, 0])
        counts[0], counts[1], counts[2] = counts[0] + 1, counts[1] + int(a), counts[2] + int(b)
    assert {int(r["class"]): [int(r["images"]), int(r["top1_correct"]), int(r["top5_correct"])]
            for r in rows} == want  # fmt: skip

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"]["test/top1"] == res["top1"]
    assert saved["metrics"]["test/top5"] == res["top5"]
    assert saved["metrics"]["extra/images"] == 3
    assert "pairs/acc" in saved["metrics"]
    table = {r["set"]: r for r in csv.DictReader(open(out / "metrics.csv"))}
    assert float(table["test"]["top5"]) == pytest.approx(res["top5"])
    assert table["pairs"]["acc"] and not table["test"]["acc"]


def test_top1_rec_label_out_of_range(trained, tmp_path) -> None:
    n = DEMO["num_classes"]
    bad = tmp_path / "bad.rec"
    _write_rec(bad, [0, n, 1])
    with pytest.raises(ev.EvaluateError, match=rf"bad\.rec: record key 1 has label {n}, "
                       rf"expected 0\.\.{n - 1} \(top1_rec"):  # fmt: skip
        ev.evaluate(_eval_cfg(trained, tmp_path / "o", f"top1_rec={bad}"))
    with pytest.raises(ev.EvaluateError, match="no RecordIO file"):
        ev.evaluate(_eval_cfg(trained, tmp_path / "o", f"top1_rec={tmp_path / 'none'}"))


def test_grayscale_checkpoint_end_to_end(trained_gray, tmp_path) -> None:
    """model.in_channels=1 trains on (B, 1, H, W) batches with a 1-channel first conv;
    evaluate.py decodes .bin and top1_rec images as grayscale and follows data.flip=false."""
    import hydra

    from hf_softmax.build import build_module

    cfg = trained_gray["cfg"]
    dm = hydra.utils.instantiate(cfg.data)  # the DataModule train.py built
    dm.setup("fit")
    images, _ = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 1, 32, 32)
    assert not dm.train_dataset.flip

    ckpt = torch.load(trained_gray["ckpt"], map_location="cpu", weights_only=False)
    saved = ckpt["hyper_parameters"]["cfg"]
    assert saved["data"]["channels"] == 1 and saved["data"]["flip"] is False
    assert saved["validation"]["flip"] is False
    assert ckpt["state_dict"]["backbone.body.0.0.weight"].shape[1] == 1  # first conv: 1 channel
    assert build_module(saved, DEMO["num_classes"]).val_flip is False

    labels = [3, 3, 7, 11, 40, 47]
    pngs = _write_rec(tmp_path / "test.rec", labels)
    out = tmp_path / "out"
    summary = ev.evaluate(_eval_cfg(trained_gray, out, f"top1_rec={tmp_path / 'test.rec'}"))
    assert summary["flip"] is False and summary["model"]["in_channels"] == 1
    top1, top5 = _dense_reference(trained_gray["ckpt"], pngs, flip=False, channels=1)
    y = torch.tensor(labels)
    assert summary["closed_set"]["test"]["top1"] == pytest.approx(float((top1 == y).float().mean()))
    assert summary["closed_set"]["test"]["top5"] == pytest.approx(
        float((top5 == y[:, None]).any(1).float().mean())
    )

    # .bin embeddings: grayscale, no flip TTA
    from data.transforms import decode_image, normalize

    feats = np.load(out / "features" / "pairs.npy")
    vs = load_bin(trained_gray["demo_dir"] / "pairs.bin")
    x = normalize(decode_image(vs.images[0], size=(32, 32), channels=1))[None]
    loaded = ev.load_checkpoint(trained_gray["ckpt"])
    with torch.no_grad():
        e = loaded.backbone(x)[0]
    np.testing.assert_allclose(feats[0], (e / e.norm()).numpy(), atol=1e-5)
    flipped = ev.evaluate(_eval_cfg(trained_gray, tmp_path / "o2", "flip=true"))
    assert flipped["flip"] is True
