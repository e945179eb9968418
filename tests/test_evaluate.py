"""evaluate.py end to end on a checkpoint from a real tiny train.py run, plus bad inputs."""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A real checkpoint: train.py's fast_dev_run on a tiny demo with a held-out split."""
    import train

    tmp = tmp_path_factory.mktemp("evaluate")
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
        ],
    )
    train.train(cfg)
    ckpts = sorted(run.glob("**/*.ckpt"))
    assert ckpts, f"train.py wrote no checkpoint under {run}"
    from data.demo import demo_dir

    return {"ckpt": ckpts[-1], "demo_root": demo_root, "demo_dir": demo_dir(demo_root, **DEMO)}


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
    from hf_softmax.module import HFSoftmaxModule

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
    module = HFSoftmaxModule(ckpt["hyper_parameters"]["cfg"], DEMO["num_classes"]).eval()
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
