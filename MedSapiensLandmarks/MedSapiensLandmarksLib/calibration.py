"""Calibrated confidence: the probability that a point lies within ``radius_mm`` of the truth.

The networks' own confidence (softmax mass near the peak) ranks points well but is not a
probability. A Platt map ``p = sigmoid(a * logit(c) + b)`` is fitted on validation cases as
part of every fit (fine-tunes included) and stored in the model card; the detector then
reports ``p``, so "red below 0.5" reads "more likely than not more than 2 mm off". For
intervals of measurements, the error of a point is a 2D Student-t whose scale gives that ``p``
and whose degrees of freedom (``tail_dof``) are fitted on the same validation points.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

EPS = 1e-4


def _logit(c: np.ndarray) -> np.ndarray:
    c = np.clip(np.asarray(c, dtype=np.float64), EPS, 1 - EPS)
    return np.log(c / (1 - c))


def fit_platt(conf: np.ndarray, hit: np.ndarray, prior: float = 1.0) -> tuple[float, float]:
    """Logistic regression of ``hit`` on logit(conf) by Newton's method; a Gaussian prior of
    weight ``prior`` pulls (a, b) towards (1, 0), i.e. the raw confidence, when data are few."""
    x = _logit(conf).ravel()
    y = np.asarray(hit, dtype=np.float64).ravel()
    w = np.array([1.0, 0.0])
    design = np.c_[x, np.ones_like(x)]
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-(design @ w)))
        grad = design.T @ (p - y) + prior * (w - [1.0, 0.0])
        hess = design.T @ (design * (p * (1 - p))[:, None]) + prior * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])


def apply(calibration: dict[str, Any] | None, conf: np.ndarray) -> np.ndarray:
    """Calibrated probability for raw confidences (unchanged without a calibration); with a
    ``site_scale`` (an adapted model), the probability under the site's wider or narrower errors."""
    if not calibration:
        return np.asarray(conf, dtype=np.float64)
    z = calibration["a"] * _logit(conf) + calibration["b"]
    prob = 1.0 / (1.0 + np.exp(-z))
    scale = calibration.get("site_scale", 1.0)
    if scale != 1.0:
        prob = rescaled(prob, scale, calibration.get("tail_dof", 1e6), calibration["radius_mm"])
    return prob


def reliability(prob: np.ndarray, hit: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Expected calibration error and the per-bin (mean probability, hit rate, count)."""
    prob, hit = np.asarray(prob, float).ravel(), np.asarray(hit, float).ravel()
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(prob, edges[1:-1]), 0, bins - 1)
    table = [(float(prob[idx == b].mean()), float(hit[idx == b].mean()), int((idx == b).sum()))
             for b in range(bins) if (idx == b).any()]
    ece = sum(n * abs(p - h) for p, h, n in table) / max(1, len(prob))
    return {"ece": float(ece), "bins": table}


def flag_stats(prob: np.ndarray, errors_mm: np.ndarray, threshold: float = 0.5,
               radius_mm: float = 2.0) -> dict[str, float]:
    """Share of points flagged (prob < threshold) and share of > radius errors they catch."""
    prob, err = np.asarray(prob).ravel(), np.asarray(errors_mm).ravel()
    flagged, bad = prob < threshold, err > radius_mm
    return {"flagged_pct": 100.0 * float(flagged.mean()),
            "caught_pct": 100.0 * float((flagged & bad).sum() / max(1, bad.sum())),
            "errors_over_radius": int(bad.sum())}


def error_scale2(prob: np.ndarray, dof: float, radius_mm: float = 2.0) -> np.ndarray:
    """Squared scale of a 2D isotropic Student-t error with ``dof`` degrees of freedom whose
    P(|error| <= radius_mm) is ``prob`` (radial CDF 1 - (1 + r^2 / (dof s^2))^(-dof / 2))."""
    p = np.clip(np.asarray(prob, dtype=np.float64), 0.02, 0.995)
    return radius_mm ** 2 / (dof * ((1.0 - p) ** (-2.0 / dof) - 1.0))


def rescaled(prob: np.ndarray, scale: float, dof: float, radius_mm: float = 2.0) -> np.ndarray:
    """P(|error| <= radius_mm) once the error model's scale is multiplied by ``scale``."""
    s2 = error_scale2(prob, dof, radius_mm) * scale ** 2
    return 1.0 - (1.0 + radius_mm ** 2 / (dof * s2)) ** (-dof / 2)


def _t_loglik(errors_mm: np.ndarray, s2: np.ndarray, dof: float) -> float:
    """Log-likelihood (up to a constant) of radial errors under 2D Student-t errors of scale s2."""
    e = np.maximum(errors_mm, 1e-3)
    return float(np.sum(np.log(e / s2) - (dof / 2 + 1) * np.log1p(e ** 2 / (dof * s2))))


SCALE_PRIOR_POINTS = 19  # the prior of `fit_scale` weighs as much as one cephalogram's points


def fit_scale(prob: np.ndarray, errors_mm: np.ndarray, dof: float, radius_mm: float = 2.0,
              prior_points: float = SCALE_PRIOR_POINTS) -> float:
    """How much wider (> 1) or narrower the errors of a new site are than the error model says:
    the multiplier of its scale, maximum a posteriori with a log-normal prior at 1 that weighs
    as much as ``prior_points`` points (a few cases move it part of the way)."""
    p, e = np.ravel(prob), np.ravel(errors_mm)
    s2 = error_scale2(p, dof, radius_mm)
    grid = np.linspace(np.log(0.5), np.log(4.0), 241)
    score = [_t_loglik(e, s2 * np.exp(2 * u), dof) - 2 * prior_points * u ** 2 for u in grid]
    return float(np.exp(grid[int(np.argmax(score))]))


def fit_tail_dof(prob: np.ndarray, errors_mm: np.ndarray, radius_mm: float = 2.0) -> float:
    """Degrees of freedom of that error model by maximum likelihood on validation points: how
    heavy the tail of the errors is beyond what the probability of "within radius" says."""
    p, e = np.ravel(prob), np.ravel(errors_mm)
    grid = np.exp(np.linspace(np.log(0.5), np.log(200.0), 400))
    return float(grid[int(np.argmax([_t_loglik(e, error_scale2(p, d, radius_mm), d) for d in grid]))])


def error_model(calibration: dict[str, Any] | None) -> dict[str, float] | None:
    """What intervals need from a card's calibration: radius and tail (None: uncalibrated)."""
    if not calibration:
        return None
    return {"radius_mm": float(calibration["radius_mm"]), "tail_dof": float(calibration.get("tail_dof", 1e6))}


def calibrate(raw_conf: np.ndarray, errors_mm: np.ndarray, radius_mm: float = 2.0,
              cases: Sequence[str] = ()) -> dict[str, Any]:
    """Card entry from validation detections: raw confidences and their errors in mm."""
    hit = np.asarray(errors_mm) <= radius_mm
    a, b = fit_platt(raw_conf, hit)
    prob = apply({"a": a, "b": b}, raw_conf)
    return {"target": f"P(error <= {radius_mm:g} mm)", "radius_mm": radius_mm, "a": a, "b": b,
            "tail_dof": fit_tail_dof(prob, errors_mm, radius_mm), "points": int(hit.size),
            "cases": list(cases), "validation_ece": reliability(prob, hit)["ece"]}
