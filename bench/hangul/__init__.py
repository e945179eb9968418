"""Real-image benchmark: the 11,172 precomposed Hangul syllables rendered in many fonts.

``python -m bench.hangul build`` discovers Korean font faces, holds some faces out as unseen
styles, renders 32x32 grayscale PNGs and writes an InsightFace-layout dataset plus
verification pair lists (see ``bench.hangul.build``).
"""

from __future__ import annotations

FIRST = 0xAC00  # 가; class id = codepoint - FIRST
NUM_SYLLABLES = 11172  # up to U+D7A3 힣
APT_PACKAGES = (
    "fonts-nanum fonts-nanum-extra fonts-unfonts-core fonts-unfonts-extra fonts-baekmuk "
    "fonts-noto-cjk fonts-noto-cjk-extra"
)
APT_HINT = f"sudo apt-get install -y {APT_PACKAGES}"


def syllable(class_id: int) -> str:
    """The syllable of a class id (0 -> '가')."""
    return chr(FIRST + class_id)
