"""Landmark accuracy: radial errors, MRE and SDR (ISBI 2015 conventions)."""
from __future__ import annotations

import numpy as np

SDR_RADII_MM = (2.0, 2.5, 3.0, 4.0)


def radial_errors(pred: np.ndarray, truth: np.ndarray, mm_per_pixel: np.ndarray | float) -> np.ndarray:
    """(N, K, 2) predictions and truths in pixels -> (N, K) errors in mm (per-image scale)."""
    scale = np.asarray(mm_per_pixel, dtype=np.float64)
    scale = scale.reshape(-1, 1) if scale.ndim else scale
    return np.linalg.norm(np.asarray(pred, float) - np.asarray(truth, float), axis=-1) * scale


def summarize(errors: np.ndarray, radii: tuple[float, ...] = SDR_RADII_MM) -> dict[str, float]:
    """MRE, its standard deviation, and SDR (% of errors strictly below each radius)."""
    e = np.asarray(errors, dtype=np.float64).ravel()
    out = {"mre_mm": float(e.mean()), "sd_mm": float(e.std())}
    out.update({f"sdr_{r:g}mm": float((e < r).mean() * 100) for r in radii})
    return out


def hand_scale(truth: np.ndarray, a: int = 1, b: int = 5, width_mm: float = 50.0) -> np.ndarray:
    """mm per pixel for hands: the distance between landmarks a and b (0-based) is 50 mm."""
    return width_mm / np.linalg.norm(truth[:, a] - truth[:, b], axis=-1)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (continuous data: ties are negligible)."""
    ra = np.argsort(np.argsort(np.ravel(a))).astype(np.float64)
    rb = np.argsort(np.argsort(np.ravel(b))).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def confidence_ranking(confidence: np.ndarray, errors: np.ndarray, fraction: float = 0.1) -> dict[str, float]:
    """How well confidence ranks errors: Spearman(confidence, error) and the MRE of the
    ``fraction`` least-confident points against the rest."""
    c, e = np.ravel(confidence), np.ravel(errors)
    low = np.argsort(c, kind="stable")[: max(1, round(fraction * len(c)))]
    rest = np.ones(len(c), bool)
    rest[low] = False
    return {"spearman": spearman(c, e), "mre_least_confident_mm": float(e[low].mean()),
            "mre_rest_mm": float(e[rest].mean()) if rest.any() else float("nan"),
            "fraction": fraction}
