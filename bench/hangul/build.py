"""Build the Hangul benchmark: fonts -> renders -> InsightFace .rec files + pair lists.

Output folder (built in a temp folder beside it, then renamed)::

    train.rec/.idx   InsightFace layout, labels 0..K-1 (class = codepoint - U+AC00), images
                     of the training faces, ``images_per_face`` jittered renders each
    test.rec/.idx    same layout and label space, one mildly jittered render per held-out face
    property         ``K,32,32``
    pairs.bin        verification pairs over the held-out faces, random negatives
    pairs_lookalike.bin   same, negatives are each syllable's pixel nearest neighbour
    manifest.json    faces used / dropped, classes, counts, args, seconds

Every image's randomness comes from its own generator seeded by ``(seed, split, face, class)``,
so the bytes do not depend on the number of worker processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from bench.hangul import APT_HINT, FIRST, NUM_SYLLABLES, syllable
from bench.hangul.fonts import FONT_DIRS, Face, pick_spread, select_faces
from bench.hangul.pairs import make_pairs, nearest_neighbours
from bench.hangul.render import Jitter, encode_png, glyph, place

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_TRAIN, _TEST = 0, 1


class NotEnoughFontsError(RuntimeError):
    """Fewer full-coverage, distinct Korean faces than the split needs."""


@dataclass(frozen=True)
class BuildArgs:
    """What the output depends on (``workers`` does not change a byte)."""

    classes: int = NUM_SYLLABLES  # the first K syllables U+AC00.. (contiguous: look-alikes)
    images_per_face: int = 1  # jittered renders per (training face, syllable)
    test_faces: int = 3  # faces held out entirely (unseen styles)
    pairs: int = 3000  # pairs in each .bin
    seed: int = 0
    size: int = 32
    test_jitter: float = 0.5  # jitter amplitude of test images relative to training
    reference_faces: int = 3  # training faces whose plain renders define look-alikes
    font_dirs: tuple[str, ...] = FONT_DIRS


def needed_faces(args: BuildArgs) -> int:
    return args.test_faces + 1


def default_out(args: BuildArgs, faces: list[Face]) -> Path:
    """``$HF_SOFTMAX_CACHE/hangul-<hash>`` (or ``~/.cache/hf_softmax``): hash of args + faces."""
    key = {"format_version": FORMAT_VERSION, **dataclasses.asdict(args)}
    key["faces"] = [f.id for f in faces]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    root = os.environ.get("HF_SOFTMAX_CACHE") or Path.home() / ".cache" / "hf_softmax"
    return Path(root).expanduser() / f"hangul-{digest}"


def _render_chunk(task: tuple) -> tuple[list[bytes], list[bytes], np.ndarray]:
    """One chunk of classes -> (train PNGs, test PNGs, reference renders (n, R, size, size))."""
    class_ids, train, test, ref, args = task
    jit = Jitter()
    test_jit = jit.scaled(args.test_jitter)
    train_out, test_out, refs = [], [], []
    for c in class_ids:
        ch = syllable(c)
        todo = (
            (_TRAIN, train, args.images_per_face, jit, train_out),
            (_TEST, test, 1, test_jit, test_out),
        )
        for split, faces, n, j, out in todo:
            for face_no, path, index in faces:
                crop = glyph(path, index, ch, args.size)
                if crop is None:
                    raise RuntimeError(f"{path}#{index}: {ch} (U+{FIRST + c:04X}) renders blank")
                rng = np.random.default_rng([args.seed, split, face_no, c])
                for _ in range(n):
                    out.append(encode_png(place(crop, args.size, rng=rng, jitter=j)))
        refs.append([place(glyph(p, i, ch, args.size), args.size) for _, p, i in ref])
    return train_out, test_out, np.asarray(refs, np.uint8)


def _write_pairs(path: Path, test_png: list[bytes], n_test: int, pairs, issame) -> None:
    from data.verification import write_bin

    images = [test_png[c * n_test + f] for c, f in pairs.reshape(-1, 2).tolist()]
    write_bin(path, images, issame)


def _verify(out: Path, k: int, n_train: int, n_test: int, n_pairs: int) -> None:
    """Read everything back with the project's readers; raise if a count is off."""
    from data.layout import read_layout
    from data.recordio import RecordReader
    from data.verification import load_bin

    for name, per in (("train", n_train), ("test", n_test)):
        lay = read_layout(RecordReader(out / f"{name}.rec", rebuild_idx=False))
        want = np.repeat(np.arange(k), per)
        if (
            lay.kind != "insightface"
            or lay.num_classes != k
            or not np.array_equal(lay.labels, want)
        ):
            raise RuntimeError(
                f"{out / name}.rec: read back {lay.kind} layout, {len(lay)} images, "
                f"{lay.num_classes} classes; expected insightface, {len(want)} images, {k} classes"
            )
    for name in ("pairs", "pairs_lookalike"):
        vs = load_bin(out / f"{name}.bin")
        if len(vs) != n_pairs or len(vs.images) != 2 * n_pairs:
            raise RuntimeError(f"{out / name}.bin: {len(vs)} pairs read back, expected {n_pairs}")


def build(args: BuildArgs, out: Path | None = None, workers: int = 2, force: bool = False) -> Path:
    """Build the dataset (or return the existing complete one); returns its folder."""
    t0 = time.perf_counter()
    if not 2 <= args.classes <= NUM_SYLLABLES:
        raise ValueError(f"--classes {args.classes}: expected 2..{NUM_SYLLABLES}")
    if args.test_faces < 2 or args.images_per_face < 1 or args.pairs < 2:
        raise ValueError(f"{args}: expected test_faces >= 2, images_per_face >= 1, pairs >= 2")
    kept, dropped = select_faces(args.font_dirs, workers)
    if len(kept) < needed_faces(args):
        raise NotEnoughFontsError(
            f"found {len(kept)} distinct Korean font faces covering all {NUM_SYLLABLES} syllables "
            f"under {list(args.font_dirs)}, need {needed_faces(args)} ({args.test_faces} held out "
            f"+ at least 1 to train on); install them with: {APT_HINT}"
        )
    rng = np.random.default_rng(args.seed)
    test = pick_spread(kept, args.test_faces, rng)
    train = [f for f in kept if f not in test]
    ref = pick_spread(train, min(args.reference_faces, len(train)), rng)
    out = Path(out) if out is not None else default_out(args, kept)
    if (out / "manifest.json").is_file() and not force:
        log.info("%s already built (manifest.json present); --force rebuilds", out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)
    try:
        _build_into(tmp, args, train, test, ref, workers)
        t_render = time.perf_counter() - t0
        k, n_train, n_test = args.classes, len(train) * args.images_per_face, len(test)
        _verify(tmp, k, n_train, n_test, args.pairs)
        manifest = {
            "format_version": FORMAT_VERSION,
            "args": dataclasses.asdict(args),
            "classes": {
                "count": k,
                "first": f"U+{FIRST:04X}",
                "last": f"U+{FIRST + k - 1:04X}",
                "class_id": "codepoint - 0xAC00",
            },  # fmt: skip
            "train_faces": [{"id": f.id, "name": f.name, "path": f.path} for f in train],
            "test_faces": [{"id": f.id, "name": f.name, "path": f.path} for f in test],
            "reference_faces": [f.id for f in ref],
            "dropped_faces": [
                {"id": d.face.id, "name": d.face.name, "reason": d.reason} for d in dropped
            ],  # fmt: skip
            "counts": {
                "train_images": k * n_train,
                "test_images": k * n_test,
                "pairs": args.pairs,
                "pairs_lookalike": args.pairs,
            },  # fmt: skip
            "bytes": {p.name: p.stat().st_size for p in sorted(tmp.iterdir())},
            "seconds": {
                "render_and_write": round(t_render, 1),
                "total": round(time.perf_counter() - t0, 1),
            },  # fmt: skip
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "hangul: %d classes, %d train faces x %d = %d train images, %d test faces, %s in %.1f s",
        args.classes, len(train), args.images_per_face, k * n_train, len(test), out,
        time.perf_counter() - t0,
    )  # fmt: skip
    return out


def _build_into(tmp: Path, args: BuildArgs, train, test, ref, workers: int) -> None:
    from data.layout import write_insightface, write_property

    k = args.classes
    number = {f: i for i, f in enumerate(train + test)}  # seeds the per-image generators
    spec = [[(number[f], f.path, f.index) for f in fs] for fs in (train, test)]
    ref_spec = [(0, f.path, f.index) for f in ref]
    step = 32
    tasks = [(range(a, min(a + step, k)), *spec, ref_spec, args) for a in range(0, k, step)]
    test_png: list[bytes] = []
    refs: list[np.ndarray] = []

    def train_payloads(results):
        for i, (tr, te, rf) in enumerate(results):
            test_png.extend(te)
            refs.append(rf)
            yield from tr
            if i % 50 == 0:
                log.info("rendered %d/%d classes", min((i + 1) * step, k), k)

    n_train = len(train) * args.images_per_face
    labels = np.repeat(np.arange(k), n_train)
    if workers > 1:
        with Pool(workers) as pool:
            results = pool.imap(_render_chunk, tasks)
            write_insightface(tmp / "train.rec", tmp / "train.idx", labels,
                              train_payloads(results), k)  # fmt: skip
    else:
        results = map(_render_chunk, tasks)
        write_insightface(tmp / "train.rec", tmp / "train.idx", labels,
                          train_payloads(results), k)  # fmt: skip
    n_test = len(test)
    write_insightface(tmp / "test.rec", tmp / "test.idx", np.repeat(np.arange(k), n_test),
                      test_png, k)  # fmt: skip
    write_property(tmp / "property", k, (args.size, args.size))

    neighbour = nearest_neighbours(np.concatenate(refs).reshape(k, -1))
    for name, seed, nb in (("pairs", 1, None), ("pairs_lookalike", 2, neighbour)):
        pairs, issame = make_pairs(np.random.default_rng([args.seed, seed]), k, n_test,
                                   args.pairs, nb)  # fmt: skip
        _write_pairs(tmp / f"{name}.bin", test_png, n_test, pairs, issame)
    sample = ", ".join(f"{syllable(c)}~{syllable(int(neighbour[c]))}" for c in range(min(k, 12)))
    log.info("look-alikes (reference-face pixel nearest neighbour): %s", sample)
