"""InsightFace verification .bin files, including the Python-2 pickle fixture."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import numpy as np
import pytest

from data.verification import VerificationFormatError, load_bin, write_bin


def test_py2_fixture_needs_bytes_encoding_and_loads(mxnet_rec_dir):
    path = mxnet_rec_dir / "pairs.bin"
    with open(path, "rb") as f, pytest.raises(UnicodeDecodeError):
        pickle.load(f)
    expected = json.loads((mxnet_rec_dir / "expected.json").read_text())["pairs"]
    vs = load_bin(path)
    assert vs.name == "pairs" and vs.path == path and len(vs) == len(expected["issame"])
    assert vs.issame.dtype == bool and vs.issame.tolist() == expected["issame"]
    assert [hashlib.sha256(img).hexdigest() for img in vs.images] == expected["sha256"]
    assert all(type(img) is bytes for img in vs.images)
    assert load_bin(path, name="lfw").name == "lfw"


def test_write_bin_round_trip(tmp_path, mxnet_rec_dir):
    vs = load_bin(mxnet_rec_dir / "pairs.bin")
    write_bin(tmp_path / "x.bin", vs.images, vs.issame)
    with open(tmp_path / "x.bin", "rb") as f:
        images, issame = pickle.load(f)  # plain Python 3 pickle, InsightFace's shape
    assert images == vs.images and issame == vs.issame.tolist()
    back = load_bin(tmp_path / "x.bin")
    assert back.images == vs.images and (back.issame == vs.issame).all()


@pytest.mark.parametrize("protocol", [2, 4])
def test_bytearray_and_array_entries(tmp_path, protocol):
    images = [bytearray(b"\xff\xd8a"), np.frombuffer(b"\x89PNGb", np.uint8)]
    with open(tmp_path / "a.bin", "wb") as f:
        pickle.dump((images, np.array([True])), f, protocol=protocol)
    vs = load_bin(tmp_path / "a.bin")
    assert vs.images == [b"\xff\xd8a", b"\x89PNGb"] and vs.issame.tolist() == [True]


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


@pytest.mark.parametrize(
    "obj, match",
    [
        ({"images": []}, "holds a dict, expected \\(images, issame\\)"),
        (([b"a", b"b"], [True], "extra"), "tuple of length 3"),
        ((b"ab", [True]), "images are bytes, expected a list"),
        (([b"a", b"b", b"c"], [True]), "3 images, expected an even number"),
        (([b"a", b"b"], [True, False]), "2 images for 2 issame flags, expected 2 \\* 2 = 4"),
        (([b"a", 5], [True]), "image 1 is int, expected encoded image bytes"),
        (([b"a", np.zeros((2, 2), np.uint8)], [True]), "image 1 is ndarray"),
        (([b"a", b"b"], ["yes"]), "issame\\[0\\] is 'yes', expected a boolean"),
        (([b"a", b"b"], 1), "issame is int"),
        (([], []), "no pairs"),
        (_RunsCode(), "references posix.system"),
    ],
)
def test_not_a_pair_list(tmp_path, obj, match):
    path = tmp_path / "bad.bin"
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    with pytest.raises(VerificationFormatError, match=match) as info:
        load_bin(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("raw", [b"", b"not a pickle", pickle.dumps(([b"a"], [True]))[:-5]])
def test_not_a_pickle(tmp_path, raw):
    path = tmp_path / "garbage.bin"
    path.write_bytes(raw)
    with pytest.raises(VerificationFormatError, match="cannot unpickle"):
        load_bin(path)


def test_write_bin_validates(tmp_path):
    with pytest.raises(VerificationFormatError, match="expected 2 \\* 2"):
        write_bin(tmp_path / "w.bin", [b"a", b"b"], [True, False])
    assert not (tmp_path / "w.bin").exists()
