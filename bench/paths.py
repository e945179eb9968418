"""Paths of the repository the benchmarks read from and write to."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
OUT_DIR = DOCS / "bench"  # results: <name>.json, figures, Markdown fragments
CONF_SAMPLER = REPO / "conf" / "sampler"
