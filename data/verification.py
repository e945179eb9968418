"""InsightFace verification sets (``lfw.bin``, ``cfp_fp.bin``, ...): pickled pair lists.

A ``.bin`` is a pickle of ``(images, issame)``: ``images`` holds 2P encoded images (JPEG/PNG
bytes; pair p is images 2p and 2p+1), ``issame`` P booleans. Many were written by Python 2
(``str`` images, BINSTRING opcodes): plain ``pickle.load`` fails on them with
UnicodeDecodeError; we load with ``encoding="bytes"`` so users need not re-pickle.

Unpickling is restricted to the builtins and numpy types such files contain, so a ``.bin``
from elsewhere cannot run code.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# (module, name) pairs a pair list may reference: py2/py3 builtins, protocol-2 bytes
# (``_codecs.encode``) and numpy arrays / scalars.
_ALLOWED = {
    ("builtins", "bytes"),
    ("builtins", "bytearray"),
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "bool"),
    ("_codecs", "encode"),
    ("codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
}


class VerificationFormatError(ValueError):
    """A ``.bin`` is not an InsightFace pair list (message: file, what was found, expected)."""


@dataclass
class VerificationSet:
    """One verification set: ``images`` (2P encoded images), ``issame`` (P,) bool."""

    name: str
    path: Path
    images: list[bytes]
    issame: np.ndarray

    def __len__(self) -> int:
        return len(self.issame)


class _PairUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str):
        if module == "__builtin__":  # Python 2 name of builtins
            module = "builtins"
        if (module, name) not in _ALLOWED:
            raise VerificationFormatError(
                f"{self._path}: pickle references {module}.{name}; expected only a pair list "
                "of encoded images and booleans"
            )
        return super().find_class(module, name)


def _image_bytes(path: Path, i: int, img) -> bytes:
    if isinstance(img, bytes):
        return img
    if isinstance(img, bytearray | memoryview):
        return bytes(img)
    if isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 1:
        return img.tobytes()
    raise VerificationFormatError(
        f"{path}: image {i} is {type(img).__name__}"
        + (f" {img.dtype}{list(img.shape)}" if isinstance(img, np.ndarray) else "")
        + ", expected encoded image bytes (bytes, bytearray or 1-D uint8 array)"
    )


def _check_pairs(path: Path, images, issame) -> tuple[list[bytes], np.ndarray]:
    if not isinstance(images, list | tuple):
        raise VerificationFormatError(
            f"{path}: images are {type(images).__name__}, expected a list of encoded images"
        )
    if isinstance(issame, np.ndarray):
        issame = issame.tolist()
    if not isinstance(issame, list | tuple):
        raise VerificationFormatError(
            f"{path}: issame is {type(issame).__name__}, expected a list of booleans"
        )
    for j, v in enumerate(issame):
        if not isinstance(v, bool | int | np.bool_ | np.integer) or v not in (0, 1):
            raise VerificationFormatError(f"{path}: issame[{j}] is {v!r}, expected a boolean")
    if len(images) % 2:
        raise VerificationFormatError(
            f"{path}: {len(images)} images, expected an even number (two per pair)"
        )
    if len(images) != 2 * len(issame):
        raise VerificationFormatError(
            f"{path}: {len(images)} images for {len(issame)} issame flags, "
            f"expected 2 * {len(issame)} = {2 * len(issame)} images"
        )
    if not issame:
        raise VerificationFormatError(f"{path}: no pairs, expected at least one")
    out = [_image_bytes(path, i, img) for i, img in enumerate(images)]
    return out, np.asarray(issame, dtype=bool)


def load_bin(path: Path | str, name: str | None = None) -> VerificationSet:
    """Read an InsightFace ``.bin`` (Python 2 or 3 pickle); ``name`` defaults to the file stem."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _PairUnpickler(f, path).load()
    except VerificationFormatError:
        raise
    except Exception as e:  # any unpickling failure means "not a pair list"
        raise VerificationFormatError(
            f"{path}: cannot unpickle ({type(e).__name__}: {e}), expected a pickled "
            "(images, issame) pair list"
        ) from e
    if not isinstance(obj, tuple | list) or len(obj) != 2:
        what = f"{type(obj).__name__}" + (
            f" of length {len(obj)}" if isinstance(obj, tuple | list) else ""
        )
        raise VerificationFormatError(f"{path}: pickle holds a {what}, expected (images, issame)")
    images, issame = _check_pairs(path, *obj)
    return VerificationSet(name or path.stem, path, images, issame)


def write_bin(path: Path | str, images, issame) -> None:
    """Write ``(images, issame)`` as InsightFace does (a pickled tuple of lists; protocol 4)."""
    path = Path(path)
    images, issame = _check_pairs(path, list(images), list(np.asarray(issame).tolist()))
    with open(path, "wb") as f:
        pickle.dump((images, [bool(v) for v in issame]), f, protocol=4)


def is_bin_name(entry: str | Path) -> bool:
    """True for a set name (``lfw``), False for a path (a separator or a ``.bin`` suffix)."""
    entry = str(entry)
    return "/" not in entry and os.sep not in entry and not entry.endswith(".bin")


def find_bin(entry: str | Path, dirs: Sequence[Path], cwd: Path | None = None) -> Path:
    """The ``.bin`` that a ``bins`` entry names (the DataModule's ``data.bins``, evaluate.py's
    ``bins``: one rule for both).

    A name (no path separator, no ``.bin`` suffix: ``lfw``) is ``<dir>/<name>.bin`` in the first
    of ``dirs`` that has it. A path is itself (a relative one against ``cwd``, default the
    working directory), else ``<dir>/<path>`` for each of ``dirs``.

    Raises:
        FileNotFoundError: naming the entry and every file looked for.
    """
    entry = str(entry)
    if is_bin_name(entry):
        candidates = [Path(d) / f"{entry}.bin" for d in dirs]
    else:
        path = Path(entry).expanduser()
        candidates = [path if path.is_absolute() else (cwd or Path.cwd()) / path]
        if not path.is_absolute():
            candidates += [Path(d) / path for d in dirs]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        looked = ", ".join(str(c) for c in candidates) or "-"
        raise FileNotFoundError(f"verification set {entry!r} not found; looked for: {looked}")
    return found
