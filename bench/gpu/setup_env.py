"""Part 1 of the GPU check: pick the Python that runs everything else (stdlib only).

Order: a venv that already has a CUDA build of torch and the project's dependencies
(``$GPU_CHECK_PYTHON``, ``.venv``, ``.venv-gpu``, the running interpreter when it is a venv);
else the README's GPU install line into ``.venv-gpu`` under a short limit (``pip install torch
--index-url .../cu128`` then ``pip install -e ".[dev]"``); if that fails (no network), the
running interpreter when its torch has CUDA. Versions, ``nvidia-smi`` and the install seconds
go to ``setup.log`` / ``setup.json`` in the output directory. ``--dry-run`` never installs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.gpu.proc import run_bounded

TORCH_INDEX = "https://download.pytorch.org/whl/cu128"
VENV = ".venv-gpu"
# the project's run-time dependencies (module: distribution), checked without importing them
DEPS = {"pytorch_lightning": "pytorch-lightning", "hydra": "hydra-core", "omegaconf": "omegaconf",
        "annoy": "annoy", "hnswlib": "hnswlib", "torchmetrics": "torchmetrics", "numpy": "numpy",
        "PIL": "pillow", "pytest": "pytest"}  # fmt: skip

PROBE = r"""
import importlib.metadata as md, importlib.util, json, platform, sys
out = {"python": sys.executable, "python_version": platform.python_version(), "missing": []}
for mod, dist in DEPS.items():
    if importlib.util.find_spec(mod) is None:
        out["missing"].append(mod)
        continue
    try:
        out[mod] = md.version(dist)
    except md.PackageNotFoundError:
        out[mod] = "?"
import torch
out["torch"] = torch.__version__
out["torch_cuda"] = torch.version.cuda
out["cuda"] = bool(torch.cuda.is_available())
if out["cuda"]:
    out["device_count"] = torch.cuda.device_count()
    out["device_name"] = torch.cuda.get_device_name(0)
    out["cudnn"] = torch.backends.cudnn.version()
    out["device_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
print("PROBE " + json.dumps(out))
""".replace("DEPS", repr(DEPS))


def probe(python: str, log: Path, limit: float = 90.0) -> dict[str, Any] | None:
    """What ``python`` has: torch, CUDA, device, dependency versions; None if it cannot say."""
    if not python or not Path(python).exists():
        return None
    probe_log = log.with_suffix(".probe.log")
    ran = run_bounded([python, "-c", PROBE], limit, probe_log)
    text = probe_log.read_text(errors="replace") if probe_log.exists() else ""
    line = next((ln for ln in reversed(text.splitlines()) if ln.startswith("PROBE ")), None)
    with open(log, "a") as fh:
        fh.write(f"probe {python}: {ran.status} in {ran.seconds:.1f}s\n")
    return json.loads(line[6:]) if ran.ok and line else None


def usable(info: dict[str, Any] | None) -> bool:
    return bool(info and info.get("cuda") and not info.get("missing"))


def candidates(repo: Path) -> list[str]:
    """Interpreters that may already hold a CUDA torch, most specific first."""
    out = []
    if os.environ.get("GPU_CHECK_PYTHON"):
        out.append(os.environ["GPU_CHECK_PYTHON"])
    out += [str(repo / ".venv" / "bin" / "python"), str(repo / VENV / "bin" / "python")]
    if sys.prefix != sys.base_prefix or os.environ.get("VIRTUAL_ENV"):
        out.append(sys.executable)
    seen: list[str] = []
    for p in out:
        if p not in seen:
            seen.append(p)
    return seen


def install(repo: Path, log: Path, limit: float) -> tuple[bool, float, str]:
    """The README's GPU install line into ``repo/.venv-gpu`` within ``limit`` seconds."""
    t0 = time.monotonic()
    venv = repo / VENV
    py = venv / "bin" / "python"
    pip = [
        str(py),
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--retries",
        "0",
        "--timeout",
        "10",
    ]
    steps = []
    if not (venv / "bin" / "pip").exists():  # absent, or left half-made by a cut-off attempt
        steps.append([sys.executable, "-m", "venv", "--clear", str(venv)])
    steps += [pip + ["torch", "--index-url", TORCH_INDEX], pip + ["-e", ".[dev]"]]
    for cmd in steps:
        ran = run_bounded(cmd, limit - (time.monotonic() - t0), log, cwd=repo)
        if not ran.ok:
            return False, time.monotonic() - t0, f"`{' '.join(cmd[-3:])}` {ran.status}"
    return True, time.monotonic() - t0, "installed"


def nvidia_smi(log: Path) -> str:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "nvidia-smi: not found"
    try:
        out = subprocess.run([exe], capture_output=True, text=True, timeout=30)
        text = out.stdout + out.stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        text = f"nvidia-smi failed: {exc}"
    with open(log, "a") as fh:
        fh.write(text + "\n")
    return text


def choose(
    repo: Path, out: Path, dry_run: bool, install_limit: float, limit: float = 120.0
) -> dict[str, Any]:
    """-> setup record: ``python`` (what runs the other parts), ``cuda``, ``how``, versions,
    ``install_seconds``, ``install`` (what happened), ``nvidia_smi``; also written to
    ``out/setup.json``. ``limit``: seconds for the whole set-up (a probe that hangs, e.g. on a
    broken driver, is cut at what is left)."""
    end = time.monotonic() + limit

    def left() -> float:
        return max(5.0, end - time.monotonic())

    log = out / "setup.log"
    out.mkdir(parents=True, exist_ok=True)
    rec: dict[str, Any] = {"install": "not needed", "install_seconds": 0.0}
    chosen: dict[str, Any] | None = None
    probed: dict[str, dict[str, Any] | None] = {}
    for py in candidates(repo):
        info = probed[py] = probe(py, log, min(90.0, left()))
        if usable(info):
            chosen, rec["how"] = info, f"existing environment with CUDA torch ({py})"
            break
    if chosen is None and dry_run:
        rec["install"] = "skipped (dry run)"
    elif chosen is None:
        ok, seconds, what = install(repo, log, min(install_limit, left()))
        rec["install_seconds"], rec["install"] = round(seconds, 1), what
        info = probe(str(repo / VENV / "bin" / "python"), log, left()) if ok else None
        if usable(info):
            chosen, rec["how"] = info, f"fresh {VENV} (README GPU install line)"
    if chosen is None:
        if sys.executable in probed:
            info = probed[sys.executable]
        else:
            info = probe(sys.executable, log, left())
        chosen = info or {"python": sys.executable, "cuda": False, "missing": ["torch"]}
        if dry_run:
            rec["how"] = "the running Python (dry run: CPU)"
        else:
            rec["how"] = (
                "fallback: the running Python "
                + ("(its torch has CUDA)" if chosen.get("cuda") else "(no CUDA: GPU parts skipped)")
                + f"; install {rec['install']}"
            )
    rec.update(chosen)
    rec["nvidia_smi"] = nvidia_smi(log)
    with open(log, "a") as fh:
        fh.write(json.dumps({k: v for k, v in rec.items() if k != "nvidia_smi"}, indent=1) + "\n")
    (out / "setup.json").write_text(json.dumps(rec, indent=1) + "\n")
    return rec
