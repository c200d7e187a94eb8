"""Overlay picture: the radiograph with numbered landmarks, coloured by confidence."""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .atomic import atomic_write
from .codec import to_gray, to_uint8_range
from .imageio import Radiograph
from .landmarks import Landmarks
from .markups import LOW_CONFIDENCE


GRAYS = 240  # palette: 240 grey levels, then the drawing colours (one byte per pixel: fast PNG)
CONFIDENCE_STEPS = 8
COLOURS = ([(255, 40, 40)]  # low confidence
           + [(int(255 * (1 - t)), 220, 40) for t in np.linspace(0, 1, CONFIDENCE_STEPS)]  # yellow -> green
           + [(0, 220, 255), (170, 0, 0), (255, 255, 255)])  # truth, banner, banner text
CYAN, BANNER, WHITE, BLACK = GRAYS + len(COLOURS) - 3, GRAYS + len(COLOURS) - 2, GRAYS + len(COLOURS) - 1, 0


def confidence_colour(c: float) -> int:
    """Palette index: red below the low-confidence threshold, yellow to green above it."""
    if c < LOW_CONFIDENCE:
        return GRAYS
    t = (c - LOW_CONFIDENCE) / (1 - LOW_CONFIDENCE)
    return GRAYS + 1 + round(t * (CONFIDENCE_STEPS - 1))


def render_overlay(image: Radiograph, lm: Landmarks, max_side: int = 2000,
                   truth: np.ndarray | None = None) -> Image.Image:
    """Palette picture with landmark i drawn as a ring labelled i+1 (truth, if given, in cyan)."""
    gray = to_uint8_range(to_gray(image.pixels), image.pixels.dtype)
    pic = Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8))
    scale = min(1.0, max_side / max(pic.size))
    if scale < 1.0:  # resized as one grey channel, then mapped to the palette
        pic = pic.resize((round(pic.width * scale), round(pic.height * scale)), Image.BILINEAR)
    pic = pic.point([v * (GRAYS - 1) // 255 for v in range(256)]).convert("P")
    pic.putpalette([c for v in range(GRAYS) for c in (v * 255 // (GRAYS - 1),) * 3]
                   + [c for rgb in COLOURS for c in rgb])
    draw = ImageDraw.Draw(pic)
    r = max(3, round(max(pic.size) / 180))
    font = ImageFont.load_default(size=max(10, 3 * r))

    def at(p: np.ndarray) -> tuple[float, float]:  # pixel centres scale about -0.5
        return ((p[0] + 0.5) * scale - 0.5, (p[1] + 0.5) * scale - 0.5)

    if truth is not None:
        for p in truth:
            x, y = at(p)
            draw.line([(x - r, y), (x + r, y)], fill=CYAN, width=2)
            draw.line([(x, y - r), (x, y + r)], fill=CYAN, width=2)
    for i, p in enumerate(lm.xy):
        if not np.isfinite(p).all():  # marked missing: nothing to draw
            continue
        x, y = at(p)
        colour = confidence_colour(float(lm.confidence[i]))
        draw.ellipse([x - r, y - r, x + r, y + r], outline=colour, width=max(2, r // 3))
        draw.text((x + r + 2, y - r - 2), str(i + 1), fill=colour, font=font,
                  stroke_width=2, stroke_fill=BLACK)
    warning = lm.meta.get("plausibility", {}).get("warning")
    if warning:  # a banner across the top: the points are there, but do not trust them
        size = max(12, pic.width // 50)
        banner = ImageFont.load_default(size=size)
        lines = textwrap.wrap(f"Warning: {warning}", width=max(20, int(pic.width / (0.55 * size))))
        draw.rectangle([0, 0, pic.width, int(size * (1.25 * len(lines) + 0.6))], fill=BANNER)
        draw.multiline_text((size // 2, size // 3), "\n".join(lines), fill=WHITE, font=banner)
    return pic


def write_overlay(path: str | Path, image: Radiograph, lm: Landmarks,
                  truth: np.ndarray | None = None) -> Path:
    with atomic_write(path) as tmp:
        render_overlay(image, lm, truth=truth).save(tmp, format="PNG", compress_level=1)
    return Path(path)
