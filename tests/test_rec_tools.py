"""``python -m data.rec2img`` / ``python -m data.img2rec`` on the MXNet-written fixture."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from data.img2rec import images_to_rec, read_list
from data.img2rec import main as img2rec_main
from data.layout import read_layout
from data.rec2img import rec_to_images
from data.recordio import RecordIOError, RecordReader, unpack

REPO = Path(__file__).resolve().parents[1]


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("tool, flag", [("data.rec2img", "--rec"), ("data.img2rec", "--src")])
def test_help(tool, flag):
    result = run_module(tool, "--help")
    assert result.returncode == 0 and flag in result.stdout and "--out" in result.stdout


def test_round_trip_cli_reproduces_mxnet_files(tmp_path, mxnet_rec_dir):
    """rec2img -> img2rec gives back MXNet's train.rec/.idx/property byte for byte."""
    expected = json.loads((mxnet_rec_dir / "expected.json").read_text())
    images, rec = tmp_path / "images", tmp_path / "rec"
    result = run_module("data.rec2img", "--rec", str(mxnet_rec_dir), "--out", str(images))
    assert result.returncode == 0, result.stderr
    assert "rec2img" in result.stderr  # tqdm progress bar
    lines = (images / "train.lst").read_text().splitlines()
    assert len(lines) == len(expected["images"])
    for line, image in zip(lines, expected["images"], strict=True):
        rel, label = line.rsplit(" ", 1)
        assert rel == f"{image['label']}/{image['key']}.jpg" and int(label) == image["label"]
        assert hashlib.sha256((images / rel).read_bytes()).hexdigest() == image["sha256"]
    result = run_module("data.img2rec", "--src", str(images / "train.lst"), "--out", str(rec))
    assert result.returncode == 0, result.stderr
    for name in ["train.rec", "train.idx", "property"]:
        assert (rec / name).read_bytes() == (mxnet_rec_dir / name).read_bytes(), name


def test_folder_source_and_val_fraction(tmp_path, mxnet_rec_dir):
    images = tmp_path / "images"
    n_train, n_val = rec_to_images(mxnet_rec_dir / "train.rec", images, val_fraction=0.3, seed=1)
    train = (images / "train.lst").read_text().splitlines()
    val = (images / "val.lst").read_text().splitlines()
    assert (len(train), len(val)) == (n_train, n_val) and n_val > 0
    assert not set(train) & set(val) and len(train) + len(val) == 58
    assert {line.split()[1] for line in train} == {str(c) for c in range(19)}  # every class kept
    again = tmp_path / "again"
    rec_to_images(mxnet_rec_dir / "train.rec", again, val_fraction=0.3, seed=1)
    assert (again / "val.lst").read_text() == (images / "val.lst").read_text()  # seeded
    # a folder source packs every image (held-out ones too): MXNet's file again
    images_to_rec(images, tmp_path / "rec")
    assert (tmp_path / "rec/train.rec").read_bytes() == (mxnet_rec_dir / "train.rec").read_bytes()
    # the held-out-free list trains on train.lst only, labels unchanged
    images_to_rec(images / "train.lst", tmp_path / "rec_train")
    with RecordReader(tmp_path / "rec_train/train.rec") as r:
        layout = read_layout(r)
        assert len(layout) == n_train
        payloads = {unpack(r.read_idx(int(k)))[1] for k in layout.image_keys}
    assert payloads == {(images / line.rsplit(" ", 1)[0]).read_bytes() for line in train}


def test_named_class_folders_and_mxnet_lst(tmp_path, mxnet_rec_dir):
    with RecordReader(mxnet_rec_dir / "train.rec") as r:
        jpgs = [unpack(r.read_idx(k))[1] for k in (1, 2, 5)]
    src = tmp_path / "src"
    for name, data in [
        ("bob/b.jpg", jpgs[0]),
        ("alice/a1.jpg", jpgs[1]),
        ("alice/a2.JPG", jpgs[2]),
    ]:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    (src / "alice/notes.txt").write_text("not an image")
    img2rec_main(["--src", str(src), "--out", str(tmp_path / "out")])
    assert (tmp_path / "out/classes.txt").read_text() == "alice\nbob\n"
    with RecordReader(tmp_path / "out/train.rec") as r:
        layout = read_layout(r)
        got = [unpack(r.read_idx(int(k)))[1] for k in layout.image_keys]
    assert layout.labels.tolist() == [0, 0, 1] and got == [jpgs[1], jpgs[2], jpgs[0]]
    assert layout.num_classes == 2 and layout.identity_ranges == {4: (1, 3), 5: (3, 4)}
    lst = tmp_path / "mx.lst"
    lst.write_text("0\t1\tsrc/bob/b.jpg\n1\t0.000000\tsrc/alice/a1.jpg\n")
    assert read_list(lst) == [(tmp_path / "src/bob/b.jpg", 1), (tmp_path / "src/alice/a1.jpg", 0)]


def test_bad_sources(tmp_path):
    lst = tmp_path / "bad.lst"
    lst.write_text("a.jpg 0\nb.jpg cat\n")
    with pytest.raises(RecordIOError, match="line 2: label 'cat'"):
        read_list(lst)
    lst.write_text("")
    with pytest.raises(RecordIOError, match="empty dataset"):
        images_to_rec(lst, tmp_path / "out")
    (tmp_path / "x.jpg").write_bytes(b"not an image")
    lst.write_text("x.jpg 0\n")
    with pytest.raises(RecordIOError, match="x.jpg: cannot read the image size"):
        images_to_rec(lst, tmp_path / "out")
