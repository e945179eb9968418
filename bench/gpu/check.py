"""The GPU check driver: five parts, each under its own limit, results under ``$OUT``.

    python -m bench.gpu                   # on a CUDA machine; <= 8 min including start-up
    python -m bench.gpu --dry-run         # CPU, CI-sized (no install), about a minute

1. set-up (``setup_env``): a Python with CUDA torch (existing venv, else a short install
   attempt, else the running interpreter); versions, ``nvidia-smi``, install seconds;
2. ``pytest -m cuda tests/test_cuda.py`` (junit XML);
3. ``train.py`` runs (``train_runs``): the demo, then a synthetic 10^5-class rec per sampler;
4. the head step at N = 10^6 / 10^7 (``head``);
5. ``summary.json`` + ``summary.md`` (``summary``).

Limits are cumulative (``proc.Deadlines``): time a part leaves unused goes to the later ones,
and the last seconds of the budget are kept for the summary. Only the standard library is
imported here, so any ``python3`` can drive the check. Exit status 0 when every part is ok.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.gpu import setup_env, summary
from bench.gpu.proc import Deadlines, run_bounded

REPO = Path(__file__).resolve().parents[2]
CAPS = {"setup": 60.0, "pytest": 70.0, "train": 200.0, "head": 110.0}  # seconds, cumulative
SUMMARY_RESERVE = 10.0
log = logging.getLogger("bench.gpu")


def default_out() -> Path:
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "gpu_results"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, no install")
    ap.add_argument("--out", type=Path, help="results directory (default $OUT, else gpu_results/)")
    ap.add_argument("--work", type=Path, help="data, checkpoints (default: a temp directory)")
    ap.add_argument("--budget", type=float, default=460.0, help="seconds for the whole check")
    ap.add_argument("--install-timeout", type=float, default=45.0, help="seconds for pip")
    return ap.parse_args(argv)


def _status(ran: dict[str, Any]) -> str:
    if ran["status"] == "failed (rc 1)" and "pytest" in " ".join(ran["cmd"]):
        return "tests failed"
    return ran["status"]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    t0 = time.monotonic()
    out = (args.out or default_out()).resolve()
    work = (args.work or Path(tempfile.gettempdir()) / "hf_softmax_gpu_check").resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s gpu_check: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(), logging.FileHandler(out / "gpu_check.log")],
    )
    clock = Deadlines(CAPS, hard_end=t0 + args.budget - SUMMARY_RESERVE)
    parts: dict[str, dict[str, Any]] = {}
    log.info(
        "output %s, work %s, budget %.0fs%s",
        out,
        work,
        args.budget,
        " (dry run)" if args.dry_run else "",
    )

    ts = time.monotonic()
    setup = setup_env.choose(
        REPO, out, args.dry_run, args.install_timeout, limit=clock.left("setup")
    )
    parts["setup"] = {
        "status": "ok",
        "seconds": round(time.monotonic() - ts, 1),
        "how": setup.get("how"),
    }
    py = setup["python"]
    log.info(
        "python %s: torch %s, CUDA %s (%s); %s",
        py,
        setup.get("torch"),
        setup.get("cuda"),
        setup.get("device_name"),
        setup.get("how"),
    )
    log.info("%s", setup.get("nvidia_smi", "").strip().splitlines()[0:1])

    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "WANDB_MODE": "offline",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "HF_SOFTMAX_CACHE": str(work / "cache"),
    }
    dry = ["--dry-run"] if args.dry_run else []
    commands = {
        "pytest": [
            py,
            "-m",
            "pytest",
            "-m",
            "cuda",
            "tests/test_cuda.py",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",  # setup.cfg's --timeout needs pytest-timeout; the part has its own limit
            f"--junitxml={out / 'pytest_cuda.xml'}",
        ],
        "train": [
            py,
            "-m",
            "bench.gpu.train_runs",
            "--out",
            str(out / "train"),
            "--work",
            str(work),
            *dry,
        ],
        "head": [py, "-m", "bench.gpu.head", "--out", str(out / "head"), *dry],
    }
    for name, cmd in commands.items():
        if not setup.get("cuda") and not args.dry_run:
            parts[name] = {"status": "skipped: no CUDA", "seconds": 0.0}
            continue
        left = clock.left(name)
        if left < 5:
            parts[name] = {"status": "skipped: no time left", "seconds": 0.0}
            continue
        if name != "pytest":  # the part shares out its own limit; keep a margin for its exit
            cmd = cmd + ["--budget", f"{max(1.0, left - 8):.0f}"]
        log.info("part %s: limit %.0fs", name, left)
        ran = run_bounded(cmd, left, out / "logs" / f"{name}.log", cwd=REPO, env=env).asdict()
        parts[name] = {
            "status": _status(ran),
            "seconds": round(ran["seconds"], 1),
            "limit_s": round(left, 1),
            "log": f"logs/{name}.log",
        }
        log.info("part %s: %s in %.0fs", name, parts[name]["status"], ran["seconds"])

    total = time.monotonic() - t0
    s = summary.build(out, parts, setup, args.dry_run, total, args.budget)
    print(summary.render_markdown(s))
    log.info("wrote %s and %s in %.0fs", out / "summary.json", out / "summary.md", total)
    return 0 if all(p["status"] == "ok" for p in parts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
