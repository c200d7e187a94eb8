"""The new-site proxy of issue 28, fixed before any tuning (docs/benchmarks.md, "Proxy site").

ISBI test2 (301-400; unseen by ceph-isbi2015 and ceph-default) through one simulated scanner
change, with the **junior** annotations as the new clinic's convention:

- resampled from 0.1 to 0.13 mm/pixel (1935x2400 -> 1488x1846 pixels, Lanczos);
- another exposure curve: gamma 0.8, then contrast x0.9 and +12 grey levels;
- blur (Gaussian, sigma 0.8 pixel), sensor noise (Gaussian, sigma 4 grey levels, seeded by the
  image number), JPEG quality 75.

    python bench/proxy_site.py ../shared/data/isbi2015-ceph runs/proxy-site

writes OUT/images/<id>.jpg, OUT/junior.csv and OUT/senior.csv (ISBI layout, pixels of the new
images; read them with ``--spacing 0.13``). Deterministic: the same files on every run.
"""
from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

SPACING_IN, SPACING_OUT = 0.1, 0.13
GAMMA, CONTRAST, OFFSET, BLUR, NOISE, QUALITY = 0.8, 0.9, 12.0, 0.8, 4.0, 75


def simulate(gray: np.ndarray, seed: int) -> bytes:
    """One radiograph (uint8, 0.1 mm/pixel) as the proxy scanner would have taken it (JPEG)."""
    h, w = gray.shape
    size = (round(w * SPACING_IN / SPACING_OUT), round(h * SPACING_IN / SPACING_OUT))
    pic = Image.fromarray(gray).resize(size, Image.LANCZOS).filter(ImageFilter.GaussianBlur(BLUR))
    x = np.asarray(pic, dtype=np.float64) / 255.0
    x = 255.0 * x ** GAMMA * CONTRAST + OFFSET
    x += np.random.default_rng(seed).normal(0.0, NOISE, x.shape)
    out = io.BytesIO()
    Image.fromarray(np.clip(np.round(x), 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=QUALITY)
    return out.getvalue()


def to_new_pixels(xy: np.ndarray) -> np.ndarray:
    """Landmark pixels of the original image -> pixels of the resampled one (pixel centres)."""
    return (xy + 0.5) * (SPACING_IN / SPACING_OUT) - 0.5


def build(isbi: Path, out: Path) -> None:
    (out / "images").mkdir(parents=True, exist_ok=True)
    for who in ("junior", "senior"):
        with open(isbi / f"test2_{who}.csv", newline="") as f:
            rows = list(csv.reader(f))
        table = [rows[0]]
        for row in rows[1:]:
            case = Path(row[0]).stem
            xy = np.array([float(v) for v in row[1:]]).reshape(-1, 2)
            table.append([row[0], *(f"{v:.2f}" for v in to_new_pixels(xy).ravel())])
            target = out / "images" / f"{case}.jpg"
            if who == "junior" and not target.exists():
                gray = np.asarray(Image.open(isbi / "images" / f"{case}.jpg").convert("L"))
                target.write_bytes(simulate(gray, int(case)))
        with open(out / f"{who}.csv", "w", newline="") as f:
            csv.writer(f).writerows(table)


if __name__ == "__main__":
    build(Path(sys.argv[1]), Path(sys.argv[2]))
