"""InsightFace and plain layouts; the header-only label path against full unpacking."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data.layout import read_layout, read_property, write_property
from data.recordio import MAGIC, IRHeader, RecordIOError, RecordReader, RecordWriter, pack, unpack


def write_plain(path, labels, keys=None):
    rec = path / "plain.rec"
    with RecordWriter(rec, path / "plain.idx") as w:
        for i, label in enumerate(labels):
            key = i if keys is None else keys[i]
            w.write_idx(key, pack(IRHeader(0, label, key, 0), b"img%d" % i))
    return rec


def write_insightface(path, labels, property_classes=None):
    """InsightFace layout as face2rec writes it; labels sorted by class."""
    labels = sorted(labels)
    n, c = len(labels), max(labels) + 1
    imgnum, totnum = n + 1, n + 1 + c
    with RecordWriter(path / "train.rec", path / "train.idx") as w:
        w.write_idx(0, pack(IRHeader(2, [imgnum, totnum], 0, 0), b""))
        for key, label in enumerate(labels, 1):
            w.write_idx(key, pack(IRHeader(0, float(label), key, 0), b"jpg"))
        starts = np.searchsorted(labels, np.arange(c + 1)) + 1
        for k in range(c):
            w.write_idx(imgnum + k, pack(IRHeader(2, [starts[k], starts[k + 1]], 0, 0), b""))
    if property_classes is not None:
        write_property(path / "property", property_classes, (112, 112))
    return path / "train.rec"


def test_fixture_layout_matches_expected(mxnet_rec_dir):
    expected = json.loads((mxnet_rec_dir / "expected.json").read_text())
    with RecordReader(mxnet_rec_dir / "train.rec") as r:
        layout = read_layout(r)
    assert layout.kind == expected["layout"] == "insightface"
    assert layout.num_classes == expected["num_classes"]
    assert layout.image_size == (112, 112)
    assert layout.image_keys.tolist() == [i["key"] for i in expected["images"]]
    assert layout.labels.tolist() == [i["label"] for i in expected["images"]]
    assert layout.labels.dtype == np.int64 and layout.image_keys.dtype == np.int64
    assert layout.identity_ranges == {i["key"]: tuple(i["range"]) for i in expected["identities"]}


def test_read_labels_matches_full_unpack(tmp_path):
    """Header-only vectorised path == unpack of every record, incl. odd records."""
    rng = np.random.default_rng(0)
    rec = tmp_path / "mix.rec"
    with RecordWriter(rec, tmp_path / "mix.idx") as w:
        for key in range(300):
            kind = key % 5
            if kind == 0:
                label = [float(rng.integers(100)), 7.0, 9.0]  # flag 3
            elif kind == 1:  # magic inside the header's id field: multi-part record
                w.write_idx(key, pack(IRHeader(0, 4.0, MAGIC, MAGIC), b"x"))
                continue
            elif kind == 2:
                label = [5.0]  # flag 1
            else:
                label = float(rng.integers(100))
            w.write_idx(key, pack(IRHeader(0, label, key, 0), rng.bytes(int(rng.integers(40)))))
    with RecordReader(rec) as r:
        positions = rng.permutation(len(r))
        flags, labels = r.read_labels(positions, width=2)
        for p, f, lab in zip(positions, flags, labels, strict=True):
            header, _ = unpack(r.read_idx(int(r.key_array[p])))
            assert f == header.flag
            ref = np.atleast_1d(np.float32(header.label))[:2]
            np.testing.assert_array_equal(lab[: len(ref)], ref)
            assert np.isnan(lab[len(ref) :]).all()


def test_plain_layout_labels_and_property(tmp_path):
    rec = write_plain(tmp_path, [3, 0, 2, 2, 7])
    with RecordReader(rec) as r:
        layout = read_layout(r)
        assert layout.kind == "plain"
        assert layout.image_keys.tolist() == [0, 1, 2, 3, 4]
        assert layout.labels.tolist() == [3, 0, 2, 2, 7]
        assert layout.num_classes == 8 and layout.image_size is None
        write_property(tmp_path / "property", 10, (96, 80))
        assert read_property(tmp_path / "property") == (10, (96, 80))
        layout = read_layout(r)
        assert layout.num_classes == 10 and layout.image_size == (96, 80)


def test_plain_layout_with_sparse_keys(tmp_path):
    rec = write_plain(tmp_path, [1, 0, 1], keys=[40, 7, 12])
    with RecordReader(rec) as r:
        layout = read_layout(r)
    assert layout.image_keys.tolist() == [40, 7, 12] and layout.labels.tolist() == [1, 0, 1]


def test_synthetic_insightface(tmp_path):
    labels = [0, 0, 1, 2, 2, 2, 4]  # class 3 has no images: empty range
    rec = write_insightface(tmp_path, labels)
    with RecordReader(rec) as r:
        layout = read_layout(r)
    assert layout.kind == "insightface" and layout.num_classes == 5
    assert layout.image_keys.tolist() == list(range(1, 8))
    assert layout.labels.tolist() == labels
    assert layout.identity_ranges[8 + 3] == (7, 7)


def test_label_outside_num_classes(tmp_path):
    rec = write_insightface(tmp_path, [0, 1, 5], property_classes=4)
    with RecordReader(rec) as r:
        with pytest.raises(RecordIOError, match=r"key 3: label 5 outside 0\.\.3.*property"):
            read_layout(r)


@pytest.mark.parametrize("bad", [-1.0, 2.5, float("nan")])
def test_label_not_a_class_id(tmp_path, bad):
    rec = write_plain(tmp_path, [0, bad, 1])
    with RecordReader(rec) as r, pytest.raises(RecordIOError, match="key 1: label"):
        read_layout(r)


def test_empty_dataset(tmp_path):
    (tmp_path / "e.rec").write_bytes(b"")
    (tmp_path / "e.idx").write_text("")
    with RecordReader(tmp_path / "e.rec") as r:
        assert len(r) == 0
        with pytest.raises(RecordIOError, match="empty dataset"):
            read_layout(r)
    with RecordWriter(tmp_path / "h.rec", tmp_path / "h.idx") as w:
        w.write_idx(0, pack(IRHeader(2, [1, 1], 0, 0), b""))  # header only, no images
    with RecordReader(tmp_path / "h.rec") as r, pytest.raises(RecordIOError, match="empty"):
        read_layout(r)


def test_bad_header_and_property(tmp_path):
    with RecordWriter(tmp_path / "h.rec", tmp_path / "h.idx") as w:
        w.write_idx(0, pack(IRHeader(2, [50, 60], 0, 0), b""))  # claims 49 images
        w.write_idx(1, pack(IRHeader(0, 0.0, 1, 0), b"x"))
    with RecordReader(tmp_path / "h.rec") as r, pytest.raises(RecordIOError, match="key 0"):
        read_layout(r)
    (tmp_path / "property").write_text("many,112,112")
    with pytest.raises(RecordIOError, match="num_classes,height,width"):
        read_property(tmp_path / "property")
