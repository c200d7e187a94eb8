"""Issue 28, item 2, the second proxy: hands. The 21 DHA valid hands (unseen by the weights of
``hand-dha``) through the proxy site's scanner change (bench/proxy_site.py ``simulate``: x0.77
pixels, exposure curve, blur, noise, JPEG); one annotation, so errors are MRE in mm (50 mm
wrist width), not a doctor-to-doctor ratio.

    python bench/hand_finetune.py ../shared/data/dha-hand runs/hand-proxy [MODEL]

For N = 3, 5, 10 the first N hands (by id) are the corrected cases and the rest are scored:
zero-shot, the layer only, the panel's Fine-tune only, and Fine-tune then the layer (as
bench/site_finetune.py). Resumable: the scanner-changed hands, detections and fine-tunes are kept.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MedSapiensLandmarks"))
from MedSapiensLandmarksLib.datasets import read_landmark_csv  # noqa: E402
from MedSapiensLandmarksLib.metrics import hand_scale  # noqa: E402

from proxy_site import simulate, to_new_pixels  # noqa: E402
from site_finetune import finetune_table, predictions  # noqa: E402

SIZES = (3, 5, 10)


def build(dha: Path, out: Path) -> Path:
    """OUT/images/<id>.jpg and OUT/landmarks.csv (DHA layout, pixels of the new images), sorted by id."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    table = out / "landmarks.csv"
    if not table.exists():
        with open(dha / "landmarks.csv", newline="") as f:
            rows = list(csv.reader(f))
        valid = sorted((r for r in rows[1:] if r[1] == "valid"), key=lambda r: Path(r[0]).stem)
        lines = [rows[0]]
        for row in valid:
            case = Path(row[0]).stem
            gray = np.asarray(Image.open(dha / "images" / Path(row[0]).name).convert("L"))
            (out / "images" / f"{case}.jpg").write_bytes(simulate(gray, int(case)))
            xy = to_new_pixels(np.array([float(v) for v in row[2:]]).reshape(-1, 2))
            lines.append([f"{case}.jpg", row[1], *(f"{v:.2f}" for v in xy.ravel())])
        with open(table, "w", newline="") as f:
            csv.writer(f).writerows(lines)
    return table


def mre(pred: np.ndarray, truth: np.ndarray) -> float:
    return float((np.linalg.norm(pred - truth, axis=-1) * hand_scale(truth)[:, None]).mean())


def main(dha: Path, out: Path, model: str = "hand-dha") -> dict:
    table = build(dha, out)
    cases = read_landmark_csv(table, out / "images")
    truth = np.stack([c.xy for c in cases])
    base = predictions(model, cases, None, out / f"pred-{model}.npy")
    return {"model": model, "hands": len(cases), "zero_shot_all_mm": mre(base, truth),
            **finetune_table(table, out / "images", out, model, cases, base, truth, None, SIZES,
                             lambda pred, n: mre(pred, truth[n:]))}


if __name__ == "__main__":
    res = main(*(Path(a).resolve() for a in sys.argv[1:3]), *(sys.argv[3:4]))
    print(json.dumps(res, indent=1))
