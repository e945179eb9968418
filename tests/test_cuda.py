"""The CUDA path (``pytest -m cuda``; every test skips without a CUDA device).

Offload keeps W pinned in host memory and moves only W[A]; the sparse row update on CUDA
equals the CPU one; bf16-mixed training of the demo stays finite with float32 rows; a
checkpoint written on CUDA resumes on CPU and the reverse; evaluate.py on CUDA gives the CPU's
accuracy. ``bash bench/gpu_check.sh`` runs this file on a lent GPU machine.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from hf_softmax.build import build_module
from hf_softmax.row_store import RowStore
from tests.conftest import module_cfg, step_losses

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.usefixtures("demo_cache"),  # tests/conftest.py
]
CUDA = torch.device("cuda")


def test_offload_keeps_rows_pinned_on_host_and_moves_only_active_rows():
    n, m, b = 200_000, 256, 32
    cfg = module_cfg("random", "cosface")
    cfg.sampler.num = m
    cfg.classifier.offload = True
    module = build_module(cfg, n).to(CUDA)
    clf = module.classifier
    clf.place(CUDA)
    d = clf.embedding_dim
    assert clf.weight.device.type == "cpu" and clf.weight.is_pinned()
    assert clf.store.momentum_buffer.device.type == "cpu" and clf.store.momentum_buffer.is_pinned()
    cfg.classifier.offload = False
    ref = build_module(cfg, n).classifier  # same seed: same W, same sampler RNG; on CPU
    assert torch.equal(ref.weight, clf.weight)

    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(b, d, generator=g), torch.randint(0, n, (b,), generator=g)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = clf(feats.to(CUDA).requires_grad_(True), labels.to(CUDA))
    assert out.rows.device.type == "cuda" and out.rows.shape == (m, d)
    out.loss.backward()
    clf.step(out, 0.1)
    torch.cuda.synchronize()
    # only O(M * D + B * M) crossed to the device, never the N x D rows (25.6 MB here)
    assert torch.cuda.max_memory_allocated() - base < n * d * 4 / 20
    assert clf.weight.device.type == "cpu" and clf.weight.is_pinned()

    out_ref = ref(feats.clone().requires_grad_(True), labels)
    out_ref.loss.backward()
    ref.step(out_ref, 0.1)
    assert torch.equal(out.active.ids, out_ref.active.ids)
    torch.testing.assert_close(out.loss.cpu(), out_ref.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(clf.weight, ref.weight, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        clf.store.momentum_buffer, ref.store.momentum_buffer, rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("where", ["cuda", "pinned-host"])
def test_sparse_sgd_on_cuda_equals_cpu(where):
    """RowStore.step_: W on the device, or W pinned on the host with a device gradient
    (offload), gives the CPU update on the rows ids and leaves the others alone."""
    n, d, lr, mu, wd = 1000, 64, 0.3, 0.9, 5e-2
    g = torch.Generator().manual_seed(1)
    w, v = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    ids = torch.randperm(n, generator=g)[:100]
    grad = torch.randn(100, d, generator=g)
    ref = RowStore(w.clone(), mu=mu, weight_decay=wd)
    ref.momentum_buffer = v.clone()
    ref.step_(ids, grad, lr)
    w_ref, v_ref = ref.weight, ref.momentum_buffer
    if where == "cuda":
        dev = RowStore(w.to(CUDA), mu=mu, weight_decay=wd)
        dev.momentum_buffer = v.to(CUDA)
    else:
        dev = RowStore(w.clone().pin_memory(), mu=mu, weight_decay=wd, offload=True)
        dev.momentum_buffer = v.clone().pin_memory()
    dev.step_(ids, grad.to(CUDA), lr)
    w_dev, v_dev = dev.weight, dev.momentum_buffer
    torch.cuda.synchronize()
    torch.testing.assert_close(w_dev.cpu(), w_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v_dev.cpu(), v_ref, rtol=1e-6, atol=1e-6)
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[ids] = False
    assert torch.equal(w_dev.cpu()[untouched], w[untouched])


def _train(overrides: list[str], run: Path, runs: Path | None = None) -> None:
    import train as train_script
    from tests.test_train import compose_cfg

    train_script.train(compose_cfg(overrides, run, runs))


def test_bf16_mixed_demo_training_stays_finite_with_float32_rows(tmp_path):
    _train(
        [
            "trainer=gpu",
            "logger=csv",
            "trainer.max_steps=6",
            "trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1",
            "callbacks.index_rebuild.background=false",
            "classifier.row_momentum=lazy",  # keeps a momentum buffer, checked below
        ],
        tmp_path,
    )
    losses = step_losses(tmp_path)
    assert sorted(losses) == list(range(6)) and all(math.isfinite(x) for x in losses.values())
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["cfg"]["trainer"]["precision"] == "bf16-mixed"
    w, v = ckpt["state_dict"]["classifier.weight"], ckpt["state_dict"]["classifier.momentum"]
    assert w.dtype == v.dtype == torch.float32
    assert bool(torch.isfinite(w).all()) and bool(v.abs().sum() > 0)  # rows were updated


@pytest.mark.parametrize("first,second", [("gpu", "cpu"), ("cpu", "gpu")])
def test_checkpoint_resumes_across_devices(tmp_path, first, second):
    common = [
        "logger=csv",
        "callbacks.index_rebuild.background=false",
        "trainer.limit_val_batches=0",
        "scheduler.total_steps=16",
    ]
    runs = tmp_path / "runs"
    _train(common + [f"trainer={first}", "trainer.max_epochs=1"], runs / "a", runs)
    _train(
        common + [f"trainer={second}", "trainer.max_epochs=2", "ckpt_path=last"], runs / "b", runs
    )
    resumed = step_losses(runs / "b")
    assert sorted(resumed) == list(range(8, 16))  # continued from the other device's step 8
    assert all(math.isfinite(x) for x in resumed.values())
    ckpt = torch.load(
        runs / "b" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert ckpt["global_step"] == 16
    assert ckpt["state_dict"]["classifier.weight"].dtype == torch.float32


def test_evaluate_on_cuda_matches_cpu(tmp_path):
    import evaluate as ev
    from data.demo import demo_dir
    from tests.test_evaluate import DEMO, _compose, _demo_overrides

    demo_root, run = tmp_path / "demo", tmp_path / "run"
    import train as train_script

    train_script.train(
        _compose(
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
    )
    ckpt = sorted(run.glob("**/*.ckpt"))[-1]
    results = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        cfg = _compose(
            "evaluate",
            [
                f"ckpt={ckpt}",
                f"out_dir={out}",
                f"paths.output_dir={out}",
                "logger=none",
                "batch_size=32",
                "plots=false",
                f"device={device}",
                "data=rec",
                f"data.path={demo_dir(demo_root, **DEMO)}",
                "bins=[pairs]",
                "data.num_workers=0",
                "data.pin_memory=false",
                *_demo_overrides(demo_root),
            ],
        )
        results[device] = ev.evaluate(cfg)
    cpu, gpu = results["cpu"], results["cuda"]
    assert gpu["sets"]["pairs"]["acc"] == pytest.approx(cpu["sets"]["pairs"]["acc"], abs=1e-4)
    assert gpu["sets"]["pairs"]["auc"] == pytest.approx(cpu["sets"]["pairs"]["auc"], abs=1e-4)
    assert gpu["top1"]["top1"] == pytest.approx(cpu["top1"]["top1"], abs=1e-4)
    assert gpu["top1"]["images"] == cpu["top1"]["images"] > 0
