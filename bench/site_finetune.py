"""Issue 28, item 2: on the proxy site, the layer only, the panel's Fine-tune only, and both
(Fine-tune, then the layer refitted on the fine-tuned model's detections of the same cases).

    python bench/site_finetune.py ../shared/data/isbi2015-ceph runs/proxy-site runs/s8/site-ft [MODEL] [--threads=N]

For N = 3, 5, 10, 25 the first N proxy images are the corrected cases: Fine-tune is the panel's
(`train --init MODEL`, 20 + 10 epochs, the last N // 5 cases held back for its check); the rest
are scored, as in bench/site_adaptation.py. ``--threads`` (default 1: beside a training job; the
panel's own is 2) goes to every Fine-tune. Resumable: finished fine-tunes are kept in OUT/N<n>.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MedSapiensLandmarks"))
from MedSapiensLandmarksLib.datasets import read_landmark_csv  # noqa: E402
from MedSapiensLandmarksLib.detector import Detector  # noqa: E402
from MedSapiensLandmarksLib.logic import FINETUNE_EPOCHS  # noqa: E402

from proxy_site import SPACING_OUT  # noqa: E402
from site_adaptation import SIZES, both, detections, layered  # noqa: E402  (bench/ is on sys.path when run)


THREADS = 1  # of each Fine-tune (``--threads``)


def finetune(csv: Path, images: Path, out: Path, model: str, ids: list[str], spacing: float | None) -> tuple[Path, dict]:
    """The panel's Fine-tune of MODEL on the cases ``ids`` of CSV (kept in OUT/N<n>) and its report."""
    folder = out / f"N{len(ids)}"
    if not (folder / "model.json").exists():
        t = time.time()
        subprocess.run([sys.executable, "-m", "MedSapiensLandmarksLib.cli", "train", "--csv", str(csv),
                        "--images", str(images), *(["--spacing", str(spacing)] if spacing else []),
                        "--ids", ",".join(ids), "--val-count", str(max(1, len(ids) // 5)), "--init", model,
                        "--threads", str(THREADS), "--coarse-epochs", str(FINETUNE_EPOCHS["coarse_epochs"]),
                        "--refine-epochs", str(FINETUNE_EPOCHS["refine_epochs"]), "-o", str(folder)],
                       check=True, cwd=ROOT / "MedSapiensLandmarks")
        (folder / "wall_s.txt").write_text(f"{time.time() - t:.0f}\n")
    report = json.loads((folder / "finetune.json").read_text())
    report["wall_s"] = float((folder / "wall_s.txt").read_text())
    return folder, report


def predictions(model: str | Path, cases, spacing: float | None, cache: Path) -> np.ndarray:
    """MODEL's points on the cases (pixels), cached in CACHE."""
    if not cache.exists():
        from MedSapiensLandmarksLib.imageio import read_image

        det = Detector.load(model)
        np.save(cache, np.stack([det.detect(read_image(c.image, spacing=spacing)).xy for c in cases]))
    return np.load(cache)


def finetune_table(csv: Path, images: Path, out: Path, model: str, cases, base: np.ndarray, truth: np.ndarray,
                   spacing: float | None, sizes: tuple[int, ...], score: Callable[[np.ndarray, int], object]) -> dict:
    """For each N of ``sizes``, the first N cases as the corrected ones: the rows, each scored on
    the other cases by ``score(points of cases[N:], N)``."""
    sp, names = (spacing or 1.0, spacing or 1.0), Detector.load(model).names
    keys = ("accepted", "mre_before_mm", "mre_after_mm", "noise_mm", "wall_s")
    result = {}
    for n in sizes:
        folder, report = finetune(csv, images, out, model, [c.case_id for c in cases[:n]], spacing)
        tuned = predictions(folder, cases, spacing, folder / "pred.npy")
        rows = {"fine-tune": {k: report.get(k) for k in keys}, "zero-shot": score(base[n:], n),
                "layer only": score(layered(base, truth, n, sp, names), n), "fine-tune only": score(tuned[n:], n),
                "fine-tune, then the layer": score(layered(tuned, truth, n, sp, names), n)}
        result[f"first_{n}"] = rows
        print(json.dumps({n: rows}), flush=True)
    return result


def main(isbi: Path, proxy: Path, out: Path, model: str = "default") -> dict:
    cases = read_landmark_csv(proxy / "junior.csv", proxy / "images")
    junior = np.stack([c.xy for c in cases])
    by_id = {c.case_id: c.xy for c in read_landmark_csv(proxy / "senior.csv", proxy / "images")}
    senior = np.stack([by_id[c.case_id] for c in cases])
    ids = [c.case_id for c in cases]
    base = detections(proxy, model, cases)
    out.mkdir(parents=True, exist_ok=True)
    return finetune_table(proxy / "junior.csv", proxy / "images", out, model, cases, base, junior, SPACING_OUT, SIZES,
                          lambda pred, n: both(pred, junior[n:], senior[n:], ids[n:]))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--threads=")]
    THREADS = next((int(a.split("=", 1)[1]) for a in sys.argv[1:] if a.startswith("--threads=")), THREADS)
    res = main(*(Path(a).resolve() for a in args[:3]), *(args[3:4]))
    print(json.dumps(res, indent=1))
