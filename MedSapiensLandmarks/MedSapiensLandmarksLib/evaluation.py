"""Evaluate a detector on annotated cases: errors, SDR, confidence ranking, analysis classes."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import analysis, cephalometry
from .calibration import calibrate, error_model, flag_stats, reliability
from .datasets import Case
from .imageio import Radiograph, read_image
from .metrics import (
    SDR_RADII_MM,
    confidence_ranking,
    hand_scale,
    radial_errors,
    summarize,
)
from .shape import MIN_SHAPES, shape_entry


@dataclass
class Evaluation:
    model: str
    names: list[str]
    cases: list[Case]
    pred: np.ndarray  # (N, K, 2) pixels
    truth: np.ndarray  # (N, K, 2) pixels
    errors: np.ndarray  # (N, K) mm
    confidence: np.ndarray  # (N, K) as reported (calibrated when the model card is)
    raw_confidence: np.ndarray  # (N, K) the network's own
    radii: tuple[float, ...]
    seconds_per_image: float
    classes: dict[str, Any] = field(default_factory=dict)
    analyses: dict[str, Any] = field(default_factory=dict)

    @property
    def overall(self) -> dict[str, float]:
        return summarize(self.errors, self.radii)

    @property
    def per_landmark(self) -> dict[str, dict[str, float]]:
        return {n: summarize(self.errors[:, k], self.radii) for k, n in enumerate(self.names)}

    @property
    def ranking(self) -> dict[str, float]:
        return confidence_ranking(self.confidence, self.errors)

    @property
    def calibration(self) -> dict[str, Any]:
        """ECE against "within 2 mm", and what the red flag (confidence < 0.5) catches."""
        rel = reliability(self.confidence, self.errors <= 2.0)
        return {"ece_2mm": rel["ece"], "bins": rel["bins"], **flag_stats(self.confidence, self.errors)}

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "images": len(self.cases), "overall": self.overall,
                "per_landmark": self.per_landmark, "confidence_ranking": self.ranking,
                "calibration": self.calibration,
                "classification": self.classes, "analyses": self.analyses,
                "seconds_per_image": self.seconds_per_image,
                "cases": [c.case_id for c in self.cases], "errors_mm": self.errors.round(4).tolist(),
                "confidence": self.confidence.round(4).tolist()}


def evaluate(det: Any, cases: Sequence[Case], truth: np.ndarray, hand: bool = False,
             images: Sequence[Radiograph] | None = None) -> Evaluation:
    """Run ``det`` on every case (``images``: the cases' images when already read); errors in mm
    (hands: 50 mm wrist-width normalisation)."""
    preds, scales, confs, raws = [], [], [], []
    t0 = time.time()
    for i, case in enumerate(cases):
        image = images[i] if images is not None else read_image(case.image, spacing=case.spacing)
        lm = det.detect(image)
        preds.append(lm.xy)
        confs.append(lm.confidence)
        raws.append(lm.meta["raw_confidence"])
        scales.append(image.spacing[0])
    seconds = (time.time() - t0) / max(1, len(cases))
    pred = np.stack(preds)
    mm = hand_scale(truth) if hand else np.array(scales)
    ev = Evaluation(det.card.get("name", ""), list(det.names), list(cases), pred, truth,
                    radial_errors(pred, truth, mm), np.stack(confs), np.stack(raws),
                    (2.0, 4.0, 10.0) if hand else SDR_RADII_MM, seconds)
    if tuple(det.names) == analysis.CEPH_NAMES:
        ev.analyses = analyses_agreement(pred, truth, scales, ev.confidence,
                                         error_model(det.card.get("calibration")))
        ev.classes = isbi_agreement(ev.analyses)
    return ev


def isbi_agreement(analyses: dict[str, Any]) -> dict[str, Any]:
    """The ISBI 2015 rows of `analyses_agreement`, keyed as the challenge's 8 measurements: per
    measurement, % of images whose class from the predicted points equals the annotated one's,
    and the mean absolute difference of the values."""
    per = analyses["per_measurement"]
    out: dict[str, Any] = {key: {"accuracy_pct": per[f"ISBI 2015 {key}"]["agreement_pct"],
                                 "mean_abs_diff": per[f"ISBI 2015 {key}"]["mean_abs_diff"]}
                           for key in analysis.MEASUREMENTS}
    out["average_accuracy_pct"] = float(np.mean([out[k]["accuracy_pct"] for k in analysis.MEASUREMENTS]))
    return out


def analyses_agreement(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
                       confidence: np.ndarray | None = None, model: dict[str, float] | None = None
                       ) -> dict[str, Any]:
    """Per measurement of every analysis: % of images whose class from the predicted points
    equals the class from the annotated ones, mean |difference|, and (calibrated models) the %
    of images whose annotated value lies inside the predicted 90 % interval; then per analysis."""
    per: dict[str, dict[str, list[float]]] = {m.key: {"agree": [], "diff": [], "inside": []}
                                              for m in cephalometry.MEASUREMENTS}
    confidence = confidence if confidence is not None else [None] * len(pred)
    for p, t, s, c in zip(pred, truth, spacing, confidence):
        rows = cephalometry.analyse(p, (s, s), c, model)
        true_values = cephalometry.measure_all(t, (s, s))
        for m, row in zip(cephalometry.MEASUREMENTS, rows):
            tv = float(true_values[m.key])
            per[m.key]["agree"].append(row["class"] == cephalometry.classify(m, tv))
            per[m.key]["diff"].append(abs(row["value"] - tv))
            if row["low"] is not None:
                per[m.key]["inside"].append(row["low"] <= tv <= row["high"])

    def pct(values: list[float]) -> float | None:
        return float(np.mean(values) * 100) if values else None
    out = {"per_measurement": {k: {"agreement_pct": pct(v["agree"]), "mean_abs_diff": float(np.mean(v["diff"])),
                                   "interval_coverage_pct": pct(v["inside"])} for k, v in per.items()}}
    out["per_analysis"] = {
        name: {key: pct(sum((per[m.key][field] for m in cephalometry.MEASUREMENTS if m.analysis == name), []))
               for key, field in (("agreement_pct", "agree"), ("interval_coverage_pct", "inside"))}
        for name in cephalometry.ANALYSES}
    return out


def card_entries(det: Any, train_xy: np.ndarray | None, val_cases: Sequence[Case], hand: bool = False
                 ) -> dict[str, Any]:
    """What every fit writes into its card from its validation cases (never test sets): the
    confidence calibration (hands: millimetres by the 50 mm wrist normalisation) and, given
    ``train_xy`` (the training annotations), the shape model with its verdict limits."""
    images = [read_image(c.image, spacing=c.spacing) for c in val_cases]
    # as a fresh fit sees them (its shape model does not exist yet): without the shape re-check
    det = type(det)(det.card, det.backend, recheck=False)
    ev = evaluate(det, val_cases, np.stack([c.xy for c in val_cases]), hand=hand, images=images)
    cal = calibrate(ev.raw_confidence, ev.errors, cases=[c.case_id for c in val_cases])
    if hand:
        cal["scale"] = "50 mm wrist width (landmarks 2-6)"
    out: dict[str, Any] = {"calibration": cal}
    spec = det.card["coarse"]["input"]
    if spec.get("orientation") == "auto":
        kept = {k: v for k, v in spec.items() if k != "mirror_check_below"}
        out["coarse"] = {**det.card["coarse"], "input": {**kept, **mirror_check(det, images)}}
    if train_xy is not None and len(train_xy) >= MIN_SHAPES:
        out["shape"] = shape_entry(train_xy, ev.pred, ev.raw_confidence)
    return out


def mirror_check(det: Any, images: Sequence[Radiograph]) -> dict[str, float]:
    """When to look at the mirror image too: below the midpoint between the least confident
    validation image as it is and the most confident one mirrored (nothing when they overlap:
    then every image is checked both ways)."""
    right, wrong = det.orientation_confidence(images)
    if right.min() <= wrong.max():
        return {}
    return {"mirror_check_below": float((right.min() + wrong.max()) / 2)}
