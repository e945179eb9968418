"""``python -m bench.hangul build|run|rows [...]``: the Hangul real-image benchmark.

``build`` renders the dataset (bench.hangul.build); ``run`` trains and scores the samplers on it
(bench.hangul.run, bench.hangul.cli_run); ``rows`` measures how a trained classifier's rows
follow its features (bench.hangul.rows).
"""

from __future__ import annotations

import argparse
import logging
import sys

from bench.hangul.build import BuildArgs, NotEnoughFontsError, build
from bench.hangul.cli_run import add_run_parser, run_main
from bench.hangul.fonts import FONT_DIRS, face_table, select_faces
from bench.hangul.rows import add_rows_parser, rows_main


def _add_build(sub) -> None:
    d = BuildArgs()
    p = sub.add_parser("build", help="render the dataset (train/test .rec, pairs .bin)")
    p.add_argument(
        "--classes",
        type=int,
        default=d.classes,
        help="first K syllables from U+AC00 (contiguous, keeps look-alikes)",
    )
    p.add_argument(
        "--images-per-face",
        type=int,
        default=d.images_per_face,
        help="jittered renders per (training face, syllable)",
    )
    p.add_argument(
        "--test-faces",
        type=int,
        default=d.test_faces,
        help="faces held out entirely for test.rec and the pairs",
    )
    p.add_argument("--pairs", type=int, default=d.pairs, help="pairs in each .bin")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--test-jitter",
        type=float,
        default=d.test_jitter,
        help="jitter of test images relative to training (0 = none)",
    )
    p.add_argument(
        "--font-dir",
        action="append",
        dest="font_dirs",
        help=f"where to look for fonts (repeatable; default {list(FONT_DIRS)})",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default $HF_SOFTMAX_CACHE/hangul-<hash of args>)",
    )
    p.add_argument("--workers", type=int, default=2, help="render processes")
    p.add_argument("--force", action="store_true", help="rebuild an existing output folder")
    p.add_argument("--list-fonts", action="store_true",
                   help="print which faces are kept or dropped (and why), then exit")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hangul", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_build(sub)
    add_run_parser(sub)
    add_rows_parser(sub)
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")  # fmt: skip
    if a.command == "run":
        return run_main(a)
    if a.command == "rows":
        return rows_main(a)
    dirs = tuple(a.font_dirs) if a.font_dirs else FONT_DIRS
    if a.list_fonts:
        print(face_table(*select_faces(dirs, a.workers)))
        return 0
    args = BuildArgs(classes=a.classes, images_per_face=a.images_per_face,
                     test_faces=a.test_faces, pairs=a.pairs, seed=a.seed,
                     test_jitter=a.test_jitter, font_dirs=dirs)  # fmt: skip
    try:
        out = build(args, a.out, workers=a.workers, force=a.force)
    except NotEnoughFontsError as e:
        logging.getLogger("bench.hangul").error("%s", e)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
