"""The Hangul benchmark builder on a tiny set: 40 syllables, the TrueType Korean fonts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.hangul import APT_HINT
from bench.hangul.build import BuildArgs, build
from bench.hangul.fonts import select_faces
from data.layout import read_layout
from data.recordio import RecordReader, unpack
from data.transforms import decode_image
from data.verification import load_bin

# TrueType only: scanning the Noto CJK collections' cmaps alone takes ~12 s
FONT_DIRS = ("/usr/share/fonts/truetype",)
ARGS = BuildArgs(classes=40, images_per_face=1, test_faces=3, pairs=60, font_dirs=FONT_DIRS)
FILES = ("train.rec", "train.idx", "test.rec", "test.idx", "property", "pairs.bin",
         "pairs_lookalike.bin")  # fmt: skip


@pytest.fixture(scope="module")
def faces():
    kept, _ = select_faces(FONT_DIRS, workers=2)
    if len(kept) < 4:
        pytest.skip(f"needs >= 4 full-coverage Korean font faces, found {len(kept)}: {APT_HINT}")
    return kept


@pytest.fixture(scope="module")
def built(faces, tmp_path_factory):
    root = tmp_path_factory.mktemp("hangul")
    a = build(ARGS, root / "a", workers=2)
    b = build(ARGS, root / "b", workers=1)
    return a, b


def test_deterministic_across_builds_and_workers(built):
    a, b = built
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_layout_labels_and_counts(built, faces):
    out = built[0]
    manifest = json.loads((out / "manifest.json").read_text())
    n_train, n_test = len(manifest["train_faces"]), len(manifest["test_faces"])
    assert n_test == 3 and n_train == len(faces) - 3
    train_ids = {f["id"] for f in manifest["train_faces"]}
    assert not train_ids & {f["id"] for f in manifest["test_faces"]}
    for name, per in (("train", n_train), ("test", n_test)):
        reader = RecordReader(out / f"{name}.rec")
        lay = read_layout(reader)
        assert lay.kind == "insightface" and lay.num_classes == 40 and lay.image_size == (32, 32)
        assert np.array_equal(lay.labels, np.repeat(np.arange(40), per))
        assert lay.identity_ranges[len(lay) + 1] == (1, 1 + per)  # class 0 owns keys 1..per
        _, png = unpack(reader.read_idx(1))
        assert tuple(decode_image(png, name).shape) == (3, 32, 32)
    assert manifest["counts"] == {"train_images": 40 * n_train, "test_images": 120,
                                  "pairs": 60, "pairs_lookalike": 60}  # fmt: skip


def test_pairs(built):
    out = built[0]
    test_png = set()
    reader = RecordReader(out / "test.rec")
    for key in range(1, 121):
        test_png.add(unpack(reader.read_idx(key))[1])
    for name in ("pairs", "pairs_lookalike"):
        vs = load_bin(out / f"{name}.bin")
        assert len(vs) == 60 and vs.issame.sum() == 30
        assert set(vs.images) <= test_png  # only held-out faces
        for p in range(len(vs)):  # the two images of a pair always differ (two faces)
            assert vs.images[2 * p] != vs.images[2 * p + 1]


def test_run_trains_and_scores_through_train_and_evaluate(built, tmp_path):
    """`bench.hangul run` on the tiny set: one real train.py + evaluate.py job, then the report."""
    from bench.hangul.cli_run import parse_job
    from bench.hangul.report import render
    from bench.hangul.run import load_results, run_all

    job = parse_job("auto rf0.5:sampler=auto sampler.random_fraction=0.5", 0.5, seed=0)
    assert (job.sampler, job.overrides) == ("auto", ["sampler.random_fraction=0.5"])
    # run folders are plain Hydra values (a comma would make hydra.run.dir a list)
    assert (
        parse_job("auto, every step (i=1):sampler=auto", 0.5, 0).name
        == "auto_every_step_i1_-f0.5-s0"
    )
    out = tmp_path / "hangul.json"
    run_all([job], built[0], steps=3, batch=8, threads=1, work=tmp_path / "runs", results_path=out)
    (row,) = load_results(out)["rows"]
    assert row["num"] == 20 and row["steps"] == 3 and row["num_classes"] == 40
    for key in ("top1", "top5", "pairs", "lookalike"):
        assert 0.0 <= row[key] <= 1.0, key
    assert row["top5"] >= row["top1"] and row["train_s"] > 0
    assert "sampler=auto" in row["command"] and "data.flip=false" in row["command"]
    assert "trainer.max_epochs=-1" in row["command"]  # the step budget decides, not the demo's 2
    assert row["rows"] == "sphere"  # the default classifier.row_norm: auto, cosine head
    assert row["probe"] == "selected rows"  # recall against the rows the steps selected with
    # a second call finds the row and runs nothing
    run_all([job], built[0], steps=3, batch=8, threads=1, work=tmp_path / "runs", results_path=out)
    assert len(load_results(out)["rows"]) == 1
    text = render(load_results(out), out_dir=tmp_path)
    assert (tmp_path / "hangul.png").exists()
    assert "| auto rf0.5 | 20 |" in text and "M/N = 50%" in text


def test_report_tables_split_by_row_rule_and_full_joins_each():
    from bench.hangul.report import group_by_budget

    def row(label, sampler, rows):
        return {"label": label, "sampler": sampler, "fraction": 0.02, "steps": 10, "batch": 4,
                "rows": rows}  # fmt: skip

    old = [row("auto", "auto", "free"), row("random", "random", "free")]
    new = [row("auto", "auto", "sphere"), row("random", "random", "sphere")]
    groups = group_by_budget([*old, row("full", "full", "free"), *new])
    assert sorted(groups) == [(0.02, 10, 4, "mixed"), (0.02, 10, 4, "sphere")]
    for rule in ("mixed", "sphere"):
        assert [r["label"] for r in groups[(0.02, 10, 4, rule)]] == ["auto", "random", "full"]
    assert list(group_by_budget([row("full", "full", "free")])) == [(0.02, 10, 4, "mixed")]


def test_report_marks_recall_probed_against_the_updated_rows():
    from bench.hangul.report import summarise

    def row(label, recall, probe=None):
        r = {"label": label, "num": 4, "top1": 0.5, "train_s": 1.0, "recall": recall}
        return r if probe is None else {**r, "probe": probe}

    got = {s["label"]: s["recall_text"] for s in summarise(
        [row("old", 0.6), row("new", 0.9, "selected rows"), row("random", None)])}  # fmt: skip
    assert got == {"old": "0.60*", "new": "0.90", "random": None}


def test_a_side_results_file_leaves_the_docs_alone(tmp_path, capsys):
    import argparse
    import json

    from bench.common import OUT_DIR
    from bench.hangul.cli_run import run_main

    row = {"label": "auto", "sampler": "auto", "fraction": 0.02, "num": 4, "seed": 0,
           "steps": 10, "batch": 4, "top1": 0.5, "train_s": 1.0, "rows": "sphere"}  # fmt: skip
    side = tmp_path / "side.json"
    side.write_text(json.dumps({"rows": [row]}))
    docs = OUT_DIR / "hangul.md"
    before = docs.stat().st_mtime_ns if docs.exists() else None
    assert run_main(argparse.Namespace(report=True, results=side)) == 0
    assert "| auto | 4 |" in capsys.readouterr().out and (tmp_path / "side.png").exists()
    assert (docs.stat().st_mtime_ns if docs.exists() else None) == before
