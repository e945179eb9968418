"""Korean font faces: discover them, keep those covering all 11,172 syllables, drop duplicates.

A face is one font inside a file (a ``.ttc`` holds several). Coverage is read from the cmap
(fontTools ``getBestCmap``), not counting syllables mapped to empty TrueType outlines. Faces
that render the syllables like an already kept face (Noto CJK JP/KR/SC/TC/HK and Mono
variants share their Hangul; YetHangul builds repeat the base font) are dropped, judged on
plain renders of ``PROBE`` syllables. Preference among duplicates: the face with the fewest
``_DISFAVOURED`` tokens in its family name, then path order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from bench.hangul import FIRST, NUM_SYLLABLES, syllable
from bench.hangul.render import glyph, place

log = logging.getLogger(__name__)

FONT_DIRS = ("/usr/share/fonts",)
FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")
PROBE = tuple(range(0, NUM_SYLLABLES, 1019))  # 11 class ids spread over the block
DUPLICATE_MAD = 2.0  # mean |pixel diff| (0..255) under which two faces count as one
_DISFAVOURED = ("JP", "SC", "TC", "HK", "Mono", "YetHangul")


@dataclass(frozen=True)
class Face:
    path: str
    index: int  # face number inside a collection (0 for .ttf/.otf)
    family: str
    style: str
    coverage: int = 0  # syllables U+AC00..U+D7A3 in the cmap with a non-empty outline
    empty: int = 0  # syllables the cmap maps to an empty TrueType outline (blank renders)

    @property
    def id(self) -> str:
        return f"{Path(self.path).name}#{self.index}"

    @property
    def name(self) -> str:
        return f"{self.family} {self.style}"


@dataclass(frozen=True)
class Dropped:
    face: Face
    reason: str


def font_files(dirs=FONT_DIRS) -> list[str]:
    """Font files under ``dirs`` (recursive), sorted."""
    files = set()
    for d in dirs:
        root = Path(d)
        if root.is_dir():
            files.update(str(p) for p in root.rglob("*") if p.suffix.lower() in FONT_SUFFIXES)
    return sorted(files)


def read_faces(path: str) -> list[Face]:
    """Every face in one font file with its names and Hangul-syllable coverage."""
    from fontTools.ttLib import TTCollection, TTFont

    try:
        if path.lower().endswith((".ttc", ".otc")):
            n = len(TTCollection(path, lazy=True).fonts)
        else:
            n = 1
        faces = []
        for i in range(n):
            font = TTFont(path, fontNumber=i, lazy=True)
            names = font["name"]
            family = names.getDebugName(16) or names.getDebugName(1) or Path(path).stem
            style = names.getDebugName(17) or names.getDebugName(2) or "Regular"
            cmap = font.getBestCmap() or {}
            glyphs = [cmap[cp] for cp in range(FIRST, FIRST + NUM_SYLLABLES) if cp in cmap]
            # some fonts map every syllable but leave most outlines empty (NanumSquare): in a
            # TrueType font an empty outline is a zero-length 'loca' entry (no glyph parsing)
            empty = 0
            if "loca" in font.reader.tables:
                loca = font["loca"]
                gids = [font.getGlyphID(g) for g in glyphs]
                empty = sum(1 for g in gids if loca[g + 1] == loca[g])
            faces.append(Face(path, i, family, style, len(glyphs) - empty, empty))
            font.close()
        return faces
    except Exception as e:  # a broken or non-font file: skip it, say why
        log.warning("%s: cannot read as a font (%s: %s); skipped", path, type(e).__name__, e)
        return []


def probe_renders(face: Face, size: int = 32) -> np.ndarray | None:
    """``(len(PROBE), size, size)`` uint8 plain renders, or None if any probe is blank."""
    out = []
    for c in PROBE:
        crop = glyph(face.path, face.index, syllable(c), size)
        if crop is None:
            return None
        out.append(place(crop, size))
    return np.stack(out)


def _preference(face: Face) -> tuple:
    return (sum(tok in face.family.split() for tok in _DISFAVOURED), face.path, face.index)


def select_faces(dirs=FONT_DIRS, workers: int = 2) -> tuple[list[Face], list[Dropped]]:
    """``(kept, dropped)``: distinct faces covering every syllable, in preference order."""
    files = font_files(dirs)
    if workers > 1 and len(files) > 1:
        with Pool(workers) as pool:
            per_file = pool.map(read_faces, files, chunksize=1)
    else:
        per_file = [read_faces(f) for f in files]
    faces = sorted((f for fs in per_file for f in fs), key=_preference)
    kept: list[Face] = []
    renders: list[np.ndarray] = []
    dropped: list[Dropped] = []
    for face in faces:
        if face.coverage < NUM_SYLLABLES:
            reason = f"cmap covers {face.coverage}/{NUM_SYLLABLES} syllables"
            if face.empty:
                reason += f" ({face.empty} more map to empty outlines)"
            dropped.append(Dropped(face, reason))
            continue
        r = probe_renders(face)
        if r is None:
            dropped.append(Dropped(face, "renders a blank probe syllable"))
            continue
        mads = [float(np.abs(r.astype(np.int16) - k).mean()) for k in renders]
        j = int(np.argmin(mads)) if mads else -1
        if j >= 0 and mads[j] < DUPLICATE_MAD:
            reason = f"renders like {kept[j].id} ({kept[j].name}; mean |diff| {mads[j]:.2f})"
            dropped.append(Dropped(face, reason))
            continue
        kept.append(face)
        renders.append(r)
    log.info("fonts: %d faces kept, %d dropped, from %d files", len(kept), len(dropped), len(files))
    return kept, dropped


def pick_spread(faces: list[Face], k: int, rng: np.random.Generator) -> list[Face]:
    """``k`` faces chosen by ``rng``, from as many different families as possible."""
    if k > len(faces):
        raise ValueError(f"cannot pick {k} faces from {len(faces)}")
    families = sorted({f.family for f in faces})
    order = [families[i] for i in rng.permutation(len(families))]
    pool = {fam: [f for f in faces if f.family == fam] for fam in families}
    picked: list[Face] = []
    while len(picked) < k:
        for fam in order:
            if pool[fam] and len(picked) < k:
                picked.append(pool[fam].pop(int(rng.integers(len(pool[fam])))))
    return picked


def face_table(kept: list[Face], dropped: list[Dropped]) -> str:
    """A plain-text table of every face and whether it is used (``--list-fonts``)."""
    rows = [("kept", f.id, f.name, "") for f in kept]
    rows += [("dropped", d.face.id, d.face.name, d.reason) for d in dropped]
    w1 = max(len(r[1]) for r in rows) if rows else 4
    w2 = max(len(r[2]) for r in rows) if rows else 4
    lines = [f"{'status':8} {'face':{w1}} {'name':{w2}} reason"]
    lines += [f"{s:8} {i:{w1}} {n:{w2}} {r}" for s, i, n, r in rows]
    return "\n".join(lines)
