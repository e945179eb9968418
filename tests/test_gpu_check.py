"""``bash bench/gpu_check.sh --dry-run``: every part of the GPU check runs on CPU, CI-sized, so
the script cannot rot between the rare runs on a lent GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from bench.benchmarks_doc import gpu_section
from tests.conftest import REPO


# ~40 s on 2 cores (70 s when other jobs hold them): seven interpreter starts. Kept in the
# default suite on purpose: CI running it is what keeps the GPU check from rotting.
def test_dry_run_writes_well_formed_summaries(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "WANDB_MODE": "offline"}
    res = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run", "--work", str(work)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])

    s = json.loads((out / "summary.json").read_text())
    assert s["dry_run"] is True and s["schema"] == 1 and s["date"] and s["device"]
    assert {k: v["status"] for k, v in s["parts"].items()} == {
        "setup": "ok", "pytest": "ok", "train": "ok", "head": "ok"
    }  # fmt: skip
    assert s["setup"]["install"] == "skipped (dry run)" and s["setup"]["torch"]
    assert (out / "setup.log").read_text()
    # part 2: the cuda tests were collected (and skip without a device)
    assert s["pytest"]["failed"] == s["pytest"]["error"] == 0 and s["pytest"]["tests"]
    # part 3: the demo and every sampler trained, with samples/s and peak memory
    assert s["train"]["demo"]["status"] == "ok" and s["train"]["demo"]["samples_per_s"] > 0
    runs = {r["sampler"]: r for r in s["train"]["rec"]["runs"]}
    assert sorted(runs) == ["annoy", "exact", "full", "hnsw", "random"]
    for r in runs.values():
        assert r["status"] == "ok" and r["steps"] == 2 and r["samples_per_s"] > 0
        assert r["peak_device_bytes"] > 0
    # part 4: every head variant at both tiny points, resident and offloaded
    rows = s["head"]["results"]
    assert {r["variant"] for r in rows} == {
        "random", "annoy", "dense-update", "full", "random [offload]", "annoy [offload]"
    }  # fmt: skip
    assert all(r["step_s"] > 0 and r["steps"] >= 3 for r in rows), rows
    assert len({(r["num_classes"], r["dim"]) for r in rows}) == 2

    md = (out / "summary.md").read_text()
    assert md.startswith("# dry run on CPU: ")
    for heading in ("`pytest -m cuda`", "`python train.py` runs", "Head step"):
        assert f"## {heading}" in md
    assert md.count("| hnsw |") == 1 and "| dense-update |" in md
    # bench.all folds it into docs/benchmarks.md one heading level down
    section = gpu_section(out)
    assert section.startswith("## GPU") and "### `pytest -m cuda`" in section


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return "gone"


def test_a_hanging_part_is_killed_at_its_limit(tmp_path):
    from bench.gpu.proc import run_bounded

    pid_file = tmp_path / "child.pid"
    cmd = ["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"]  # the child must go too
    ran = run_bounded(cmd, 1.0, tmp_path / "log", grace=1.0)
    assert ran.timed_out and ran.status == "timeout" and ran.seconds < 10
    child = int(pid_file.read_text())
    for _ in range(50):  # reaped by init shortly after the kill
        if not Path(f"/proc/{child}").exists() or "Z" in _state(child):
            break
        time.sleep(0.1)
    assert not Path(f"/proc/{child}").exists() or "Z" in _state(child)
    assert "TIMED OUT" in (tmp_path / "log").read_text()
    assert run_bounded(["true"], 5.0, tmp_path / "log").ok


def test_deadlines_bank_unused_time():
    from bench.gpu.proc import Deadlines

    clock = Deadlines({"a": 10.0, "b": 20.0}, hard_end=None)
    assert 9 < clock.left("a") <= 10 and 29 < clock.left("b") <= 30  # b gets what a leaves
    assert Deadlines({"a": 10.0}, hard_end=clock.start + 3).left("a") <= 3


def test_summary_of_parts_that_left_no_files(tmp_path):
    """A part that failed or timed out still gets its row; missing files are not an error."""
    from bench.gpu.summary import build

    parts = {
        "setup": {"status": "ok", "seconds": 3.0},
        "pytest": {"status": "timeout", "seconds": 70.0},
        "train": {"status": "skipped: no time left", "seconds": 0.0},
    }
    s = build(tmp_path, parts, {"python": "python3", "cuda": True, "device_name": "GPU X"},
              dry_run=False, total_s=80.0, budget_s=460.0)  # fmt: skip
    assert s["device"] == "GPU X" and s["pytest"] is None and s["train"] is None
    md = (tmp_path / "summary.md").read_text()
    assert md.startswith("# GPU check: GPU X, ") and "| pytest | timeout | 70 |" in md
    assert json.loads((tmp_path / "summary.json").read_text())["parts"] == parts
