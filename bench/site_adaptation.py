"""Site convention layer on the proxy site (bench/proxy_site.py): model-to-doctor error divided
by doctor-to-doctor error, zero-shot and after adapting to the first N corrected cases.

    python bench/site_adaptation.py ../shared/data/isbi2015-ceph runs/proxy-site [MODEL]

Detections are cached in OUT/pred-<model>.npy. The first N images (301, 302, ...) are the
corrected cases (junior annotations), the rest are scored against the junior annotations; the
doctor-to-doctor error is senior vs junior on the same scored images.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MedSapiensLandmarks"))
from MedSapiensLandmarksLib.adaptation import FRAMES, apply_layer, fit_layer  # noqa: E402
from MedSapiensLandmarksLib.datasets import read_landmark_csv  # noqa: E402
from MedSapiensLandmarksLib.site_model import SiteCases, adapt_cases  # noqa: E402

from proxy_site import SPACING_OUT, build  # noqa: E402

SIZES, SHRINKS = (3, 5, 10, 25), (0.0, 0.5, 1.0, 2.0)


def detections(out: Path, model: str, cases, raw: bool = False) -> np.ndarray:
    """The model's points on the cases (pixels), or with ``raw`` its own confidences (cached)."""
    cache, raw_cache = out / f"pred-{model}.npy", out / f"raw-{model}.npy"
    if not (cache.exists() and raw_cache.exists()):
        from MedSapiensLandmarksLib.detector import Detector
        from MedSapiensLandmarksLib.imageio import read_image

        det = Detector.load(model)
        found = [det.detect(read_image(c.image, spacing=SPACING_OUT)) for c in cases]
        np.save(cache, np.stack([lm.xy for lm in found]))
        np.save(raw_cache, np.stack([lm.meta["raw_confidence"] for lm in found]))
    return np.load(raw_cache if raw else cache)


OUTLIER = "322"  # the model fails on it (84 mm zero-shot); rows are given with and without it


def ratio(pred: np.ndarray, junior: np.ndarray, senior: np.ndarray, keep: np.ndarray | None = None) -> float:
    keep = np.ones(len(pred), bool) if keep is None else keep
    model = np.linalg.norm(pred[keep] - junior[keep], axis=-1).mean()
    doctors = np.linalg.norm(senior[keep] - junior[keep], axis=-1).mean()
    return float(model / doctors)


def both(pred: np.ndarray, junior: np.ndarray, senior: np.ndarray, ids: list[str]) -> str:
    """'ratio (ratio without the outlier)'."""
    keep = np.array([i != OUTLIER for i in ids])
    return f"{ratio(pred, junior, senior):.3f} ({ratio(pred, junior, senior, keep):.3f})"


def layered(pred: np.ndarray, truth: np.ndarray, n: int, sp: tuple[float, float], names) -> np.ndarray:
    """pred[n:] moved by the layer of the first n cases as every Export fits it (withheld where
    the cases say so)."""
    site = SiteCases()
    for i in range(n):
        site.add(str(i), pred[i], truth[i], sp, None)
    layer = adapt_cases(site, names, None).layer
    return np.stack([apply_layer(p, sp, names, layer) for p in pred[n:]])


def main(isbi: Path, out: Path, model: str = "default") -> dict:
    if not (out / "junior.csv").exists():
        build(isbi, out)
    junior_cases = read_landmark_csv(out / "junior.csv", out / "images")
    junior = np.stack([c.xy for c in junior_cases])
    by_id = {c.case_id: c.xy for c in read_landmark_csv(out / "senior.csv", out / "images")}
    senior = np.stack([by_id[c.case_id] for c in junior_cases])  # the two files' rows differ in order
    pred = detections(out, model, junior_cases)
    from MedSapiensLandmarksLib.detector import Detector

    names = Detector.load(model).names
    sp = (SPACING_OUT, SPACING_OUT)
    n_all = len(pred)
    ids = [c.case_id for c in junior_cases]
    result = {"model": model, "images": n_all,
              "doctor_mre_mm": float(np.linalg.norm(senior - junior, axis=-1).mean() * SPACING_OUT),
              "zero_shot": {"ratio": both(pred, junior, senior, ids),
                            "mre_mm": float(np.linalg.norm(pred - junior, axis=-1).mean() * SPACING_OUT),
                            "sdr_2mm": float((np.linalg.norm(pred - junior, axis=-1) * SPACING_OUT < 2).mean() * 100)}}
    for frame in FRAMES:  # the oracle: each image adapted to all the others (no shrink)
        moved = np.stack([apply_layer(pred[i], sp, names, fit_layer(
            [p for j, p in enumerate(pred) if j != i], [t for j, t in enumerate(junior) if j != i],
            [sp] * (n_all - 1), names, frame, 0.0)) for i in range(n_all)])
        result[f"oracle_{frame}"] = both(moved, junior, senior, ids)
    for n in (1, 2, *SIZES):
        rows = {}
        for frame in FRAMES:
            for shrink in SHRINKS:
                layer = fit_layer(list(pred[:n]), list(junior[:n]), [sp] * n, names, frame, shrink)
                moved = np.stack([apply_layer(p, sp, names, layer) for p in pred[n:]])
                rows[f"{frame} shrink {shrink:g}"] = both(moved, junior[n:], senior[n:], ids[n:])
        rows["as every Export fits it (sn, shrink 0.5, withheld where the cases say)"] = both(
            layered(pred, junior, n, sp, names), junior[n:], senior[n:], ids[n:])
        rows["zero-shot on the same images"] = both(pred[n:], junior[n:], senior[n:], ids[n:])
        result[f"first_{n}"] = rows
    return result


if __name__ == "__main__":
    res = main(Path(sys.argv[1]), Path(sys.argv[2]), *(sys.argv[3:4]))
    print(json.dumps(res, indent=1))
