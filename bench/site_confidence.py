"""Issue 28: does the confidence stay calibrated at the proxy site once the layer is applied?

    python bench/site_confidence.py ../shared/data/isbi2015-ceph runs/proxy-site [MODEL]

For N = 3, 5, 10, 25 the first N proxy images are the corrected cases (junior annotations): the
layer and the site's error scale are fitted on them as every Export does (`adapt_cases`), and the
other images are scored with the layer applied: expected calibration error of P(error <= 2 mm),
mean confidence against the share within 2 mm, and the share of points inside their predicted
90 % radius, with the base model's calibration and with the site's. Rows with and without 322.
A stress row checks the widening itself: the errors without the layer (a site whose convention
no layer has learned), the scale fitted on the first N cases' errors and scored on the rest.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MedSapiensLandmarks"))
from MedSapiensLandmarksLib.adaptation import apply_layer  # noqa: E402
from MedSapiensLandmarksLib.calibration import apply, error_scale2, fit_scale, reliability  # noqa: E402
from MedSapiensLandmarksLib.datasets import read_landmark_csv  # noqa: E402
from MedSapiensLandmarksLib.detector import Detector  # noqa: E402
from MedSapiensLandmarksLib.site_model import SiteCases, adapt_cases  # noqa: E402

from proxy_site import SPACING_OUT, build  # noqa: E402
from site_adaptation import OUTLIER, SIZES, detections  # noqa: E402


def scores(cal: dict, raw: np.ndarray, errors: np.ndarray) -> dict:
    prob = apply(cal, raw)
    hit = errors <= cal["radius_mm"]
    dof = float(cal.get("tail_dof", 1e6))
    r90 = np.sqrt(dof * error_scale2(prob, dof, cal["radius_mm"]) * (0.1 ** (-2 / dof) - 1))
    return {"ece": round(reliability(prob, hit)["ece"], 4), "mean_confidence": round(float(prob.mean()), 4),
            "within_2mm": round(float(hit.mean()), 4), "in_90pct_radius": round(float((errors <= r90).mean()), 4)}


def main(isbi: Path, out: Path, model: str = "default") -> dict:
    if not (out / "junior.csv").exists():
        build(isbi, out)
    cases = read_landmark_csv(out / "junior.csv", out / "images")
    junior, ids = np.stack([c.xy for c in cases]), [c.case_id for c in cases]
    pred, raw = detections(out, model, cases), detections(out, model, cases, raw=True)
    det = Detector.load(model)
    base_cal, sp = det.card["calibration"], (SPACING_OUT, SPACING_OUT)
    result: dict = {"model": model}
    for n in SIZES:
        site = SiteCases()
        for i in range(n):
            site.add(ids[i], pred[i], junior[i], sp, raw[i])
        adapted = adapt_cases(site, det.names, base_cal)
        moved = np.stack([apply_layer(p, sp, det.names, adapted.layer) for p in pred[n:]])
        errors = np.linalg.norm(moved - junior[n:], axis=-1) * SPACING_OUT
        keep = np.array([i != OUTLIER for i in ids[n:]])
        result[f"first_{n}"] = {"site_scale": adapted.calibration["site_scale"], **{
            f"{which}{suffix}": scores(cal, raw[n:][rows], errors[rows])
            for which, cal in (("base", base_cal), ("site", adapted.calibration))
            for suffix, rows in (("", slice(None)), (" without 322", keep))}}
        raw_err = np.linalg.norm(pred - junior, axis=-1) * SPACING_OUT
        dof = float(base_cal.get("tail_dof", 1e6))
        scale = max(1.0, fit_scale(apply(base_cal, raw[:n]), raw_err[:n], dof, base_cal["radius_mm"]))
        result[f"first_{n}"]["no layer"] = {
            "site_scale": round(scale, 4), "base": scores(base_cal, raw[n:], raw_err[n:]),
            "site": scores({**base_cal, "site_scale": scale}, raw[n:], raw_err[n:])}
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]), *(sys.argv[3:4])), indent=1))
