"""Run one command under a wall-clock limit; a hang cannot outlive its limit (stdlib only).

The command runs in its own session; on timeout the whole process group (DataLoader
workers, index-build threads' processes, pytest's children) gets SIGTERM, then SIGKILL
``grace`` seconds later. stdout and stderr go to ``log``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class Ran:
    """One bounded command: exit status (None when killed), wall seconds, whether it timed out."""

    cmd: list[str]
    rc: int | None
    seconds: float
    timed_out: bool
    limit_s: float
    log: str

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out

    @property
    def status(self) -> str:
        return "ok" if self.ok else ("timeout" if self.timed_out else f"failed (rc {self.rc})")

    def asdict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status}


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_bounded(
    cmd: list[str],
    limit_s: float,
    log: Path,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    grace: float = 5.0,
) -> Ran:
    """``cmd`` with at most ``limit_s`` seconds of wall time (at least 1); output appended to
    ``log``. Never raises for the command's own failure: see ``Ran.rc`` / ``Ran.timed_out``."""
    limit_s = max(1.0, float(limit_s))
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "ab") as fh:
        fh.write(f"$ {' '.join(cmd)}   (limit {limit_s:.0f}s)\n".encode())
        fh.flush()
        try:
            proc = subprocess.Popen(
                cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
        except OSError as exc:  # e.g. the interpreter does not exist
            fh.write(f"cannot start: {exc}\n".encode())
            return Ran(cmd, 127, time.perf_counter() - t0, False, limit_s, str(log))
        timed_out = False
        try:
            rc: int | None = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _kill_group(proc, signal.SIGKILL)
                proc.wait()
            rc = None
        seconds = time.perf_counter() - t0
        note = "TIMED OUT" if timed_out else f"rc {rc}"
        fh.write(f"--- {note} after {seconds:.1f}s\n".encode())
    return Ran(cmd, rc, seconds, timed_out, limit_s, str(log))


class Deadlines:
    """Cumulative time caps: part i must end by start + caps[0] + ... + caps[i], so time an
    early part does not use is banked for the later ones, and no part can eat the time kept
    for the parts after it beyond its own share. ``hard_end``: absolute end (monotonic)."""

    def __init__(self, caps: dict[str, float], hard_end: float | None = None) -> None:
        self.start = time.monotonic()
        self.ends: dict[str, float] = {}
        acc = self.start
        for name, cap in caps.items():
            acc += cap
            self.ends[name] = acc
        self.hard_end = hard_end

    def left(self, name: str) -> float:
        """Seconds part ``name`` may still run (>= 0)."""
        end = self.ends[name]
        if self.hard_end is not None:
            end = min(end, self.hard_end)
        return max(0.0, end - time.monotonic())

    def elapsed(self) -> float:
        return time.monotonic() - self.start
