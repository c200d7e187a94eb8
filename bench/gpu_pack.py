"""Issue 27, the GPU path: a data pack small enough to travel to a lent GPU machine.

    python bench/gpu_pack.py ../shared/data runs/gpu-pack.zip

What travels is the working tree (59 MB with the four shipped models) plus what a call carries,
64 MiB in all: the pack gets under 8 MB. ISBI 001-150 (senior and junior annotations) at a third
of the resolution (0.3 mm/pixel, 645x800, JPEG quality 75: 6.4 MB): finer than the whole-image stage's
input even at 800x640 (0.375 mm/pixel over the padded image), too coarse for the patch stage
(0.225 mm/pixel), which trains on the CPU anyway (minutes). In the layout `train --csv` reads:

    isbi/images/<id>.jpg  isbi/train_senior.csv  isbi/train_junior.csv   (read with --spacing 0.3)

Coordinates follow the images with the pixel-centre rule x' = (x + 0.5) / 3 - 0.5. Nothing of
test1 or test2 goes in. bench/gpu_train.py trains from it.
"""
from __future__ import annotations

import csv
import io
import sys
import zipfile
from pathlib import Path

from PIL import Image

SCALE, QUALITY, LIMIT = 1 / 3, 75, 8 * 10 ** 6


def half(xy: str) -> str:
    return f"{(float(xy) + 0.5) * SCALE - 0.5:.2f}"


def _write(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))  # reproducible: same bytes every run
    zf.writestr(info, data, compress_type=zipfile.ZIP_STORED if name.endswith(".jpg") else zipfile.ZIP_DEFLATED)


def _csv(rows: list[list[str]]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue().encode()


def build(data: Path, out: Path) -> dict[str, int]:
    out.parent.mkdir(parents=True, exist_ok=True)
    counts = {}
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(tmp, "w") as zf:
        isbi = data / "isbi2015-ceph"
        for who in ("senior", "junior"):
            with open(isbi / f"train_{who}.csv", newline="") as f:
                rows = list(csv.reader(f))
            _write(zf, f"isbi/train_{who}.csv", _csv([rows[0]] + [[r[0], *map(half, r[1:])] for r in rows[1:]]))
        for row in rows[1:]:
            pic = Image.open(isbi / "images" / row[0]).convert("L")
            pic = pic.resize((round(pic.width * SCALE), round(pic.height * SCALE)), Image.LANCZOS)
            buf = io.BytesIO()
            pic.save(buf, format="JPEG", quality=QUALITY)
            _write(zf, f"isbi/images/{row[0]}", buf.getvalue())
        counts["isbi"] = len(rows) - 1
    if tmp.stat().st_size > LIMIT:
        tmp.unlink()
        raise SystemExit(f"the pack would be over {LIMIT / 1e6:g} MB")
    tmp.replace(out)
    counts["bytes"] = out.stat().st_size
    return counts


if __name__ == "__main__":
    print(build(Path(sys.argv[1]), Path(sys.argv[2])))
