"""Shape model of a landmark set: is a detected configuration anatomy, and is each point where
the other points put it?  Numpy only: the model lives in the model card.

Shapes are aligned to the mean shape by a similarity transform (reflections allowed: a
cephalogram facing left and a left hand are the same anatomy as their mirror images); the
aligned coordinates get a probabilistic PCA model (Tipping & Bishop 1999). A configuration's
score is its Mahalanobis distance under that model; its tail probability is read from the
scores of training shapes held out of the fit (5-fold), so it needs no Gaussian assumption.
Per point, the conditional distribution given the other points (each aligned without it)
says where the others put it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

VARIANCE_KEPT = 0.98  # share of the aligned-shape variance held by the principal components
FOLDS = 5
MIN_SHAPES = 10  # fewer training shapes: no shape model (a fine-tune on a handful of cases)
# Verdict limits: margins over what validation images show (chosen on ISBI validation images
# 141-150 against hands, crops and noise; docs/reliability.md has the rates).
SCORE_MARGIN = 1.5
CONFIDENCE_MARGIN = 0.5
# The re-check of gross errors (`recheck`; chosen on DHA valid hands and ISBI 141-150 under the
# stress changes: docs/benchmarks.md, round 9): a point this far (shape deviation) from where
# the other points put it is looked at again, for at most this share of an image's points.
RECHECK_DEVIATION = 8.0
RECHECK_SHARE = 0.25


def procrustes(x: np.ndarray, ref: np.ndarray, use: np.ndarray | None = None
               ) -> tuple[float, np.ndarray, np.ndarray]:
    """Similarity (scale, orthogonal matrix, translation) mapping ``x[use]`` onto ``ref[use]`` by
    least squares; apply as ``s * x @ r + t``. Reflections are allowed."""
    xs, rs = (x, ref) if use is None else (x[use], ref[use])
    mx, mr = xs.mean(0), rs.mean(0)
    u, sv, vt = np.linalg.svd((xs - mx).T @ (rs - mr))
    r = u @ vt
    s = float(sv.sum() / max(((xs - mx) ** 2).sum(), 1e-12))
    return s, r, mr - s * mx @ r


def _aligned(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    s, r, t = procrustes(x, ref)
    return s * x @ r + t


def mean_shape(shapes: np.ndarray, iterations: int = 20) -> np.ndarray:
    """Generalised Procrustes mean, centred and of unit norm."""
    ref = shapes[0] - shapes[0].mean(0)
    ref = ref / np.linalg.norm(ref)
    for _ in range(iterations):
        new = np.mean([_aligned(x, ref) for x in shapes], axis=0)
        new = new - new.mean(0)
        new = new / np.linalg.norm(new)
        if np.abs(new - ref).max() < 1e-10:
            break
        ref = new
    return ref


def _ppca(vectors: np.ndarray) -> dict[str, Any]:
    """Mean, principal components and variances, and the isotropic rest (sigma^2)."""
    mu = vectors.mean(0)
    lam, vec = np.linalg.eigh(np.cov(vectors - mu, rowvar=False))
    lam, vec = np.clip(lam[::-1], 0.0, None), vec[:, ::-1]
    rank = min(len(vectors) - 1, vectors.shape[1] - 4)  # alignment removes 4 dimensions
    m = int(np.searchsorted(np.cumsum(lam[:rank]) / lam[:rank].sum(), VARIANCE_KEPT) + 1)
    m = min(m, rank - 1)
    sigma2 = float(max(lam[m:rank].mean(), 1e-3 * lam[0]))
    return {"mean": mu, "components": vec[:, :m].T, "variances": lam[:m], "sigma2": sigma2}


class ShapeModel:
    """A fitted shape model (``ShapeModel.fit``) or one read from a card (``ShapeModel(entry)``)."""

    def __init__(self, entry: dict[str, Any]) -> None:
        self.entry = entry
        self.ref = np.asarray(entry["mean_shape"], dtype=np.float64)
        self.mu = np.asarray(entry["mean"], dtype=np.float64)
        comps = np.asarray(entry["components"], dtype=np.float64).reshape(-1, self.mu.size)
        cov = comps.T @ (np.asarray(entry["variances"])[:, None] * comps)
        self.cov = cov + entry["sigma2"] * np.eye(self.mu.size)
        self.precision = np.linalg.inv(self.cov)
        self.reference = np.sort(np.asarray(entry.get("reference_scores", []), dtype=np.float64))
        self._conditionals: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None

    @classmethod
    def fit(cls, shapes: np.ndarray, folds: int = FOLDS) -> "ShapeModel":
        """Model of (N, K, 2) annotated shapes (pixels or mm; only the shape matters), with the
        scores of each shape under a model fitted without its fold as the reference."""
        shapes = np.asarray(shapes, dtype=np.float64)
        model = cls(cls._entry(shapes))
        fold = np.arange(len(shapes)) % folds
        held_out = [cls(cls._entry(shapes[fold != f])).score(x)
                    for f in range(folds) for x in shapes[fold == f]]
        model.entry["reference_scores"] = sorted(float(v) for v in held_out)
        model.reference = np.sort(held_out)
        return model

    @staticmethod
    def _entry(shapes: np.ndarray) -> dict[str, Any]:
        ref = mean_shape(shapes)
        pca = _ppca(np.stack([_aligned(x, ref).ravel() for x in shapes]))
        return {"mean_shape": ref.tolist(), "mean": pca["mean"].tolist(),
                "components": pca["components"].tolist(), "variances": pca["variances"].tolist(),
                "sigma2": pca["sigma2"], "shapes": len(shapes)}

    def score(self, xy: np.ndarray) -> float:
        """Squared Mahalanobis distance of a configuration (pixels) from the training shapes."""
        d = _aligned(np.asarray(xy, dtype=np.float64), self.ref).ravel() - self.mu
        return float(d @ self.precision @ d)

    def tail(self, score: float) -> float:
        """Share of held-out training shapes scoring at least ``score`` (+1 smoothed)."""
        n = len(self.reference)
        return float((1 + n - np.searchsorted(self.reference, score)) / (n + 1))

    def _condition(self, k: int, use: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Regression of point k's 2 coordinates on those of the points in ``use`` (mask without
        k), their coordinate index, and the inverse conditional covariance."""
        own = np.array([2 * k, 2 * k + 1])
        rest = np.flatnonzero(np.repeat(use, 2))
        gain = self.cov[np.ix_(own, rest)] @ np.linalg.inv(self.cov[np.ix_(rest, rest)])
        cond = self.cov[np.ix_(own, own)] - gain @ self.cov[np.ix_(rest, own)]
        return gain, rest, np.linalg.inv(cond)

    def _conditional(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """`_condition` of each point on all the others (cached)."""
        if self._conditionals is None:
            n = self.ref.shape[0]
            self._conditionals = [self._condition(k, np.arange(n) != k) for k in range(n)]
        return self._conditionals

    def deviation(self, xy: np.ndarray, k: int, use: np.ndarray | None = None) -> tuple[float, np.ndarray]:
        """Mahalanobis distance of point k from where the points in ``use`` (mask; default: all
        the others) put it, the shape aligned on them alone; and that position in the input's pixels."""
        xy = np.asarray(xy, dtype=np.float64)
        others = np.arange(len(xy)) != k
        use = others if use is None else np.asarray(use, dtype=bool) & others
        if use.sum() < 2:  # nothing to align on
            return float("inf"), xy[k].copy()
        gain, rest, inv = self._conditional()[k] if use[others].all() else self._condition(k, use)
        s, r, t = procrustes(xy, self.ref, use=use)
        v = (s * xy @ r + t).ravel()
        pred = self.mu[2 * k:2 * k + 2] + gain @ (v[rest] - self.mu[rest])
        d = v[2 * k:2 * k + 2] - pred
        return float(np.sqrt(d @ inv @ d)), (pred - t) @ r.T / s

    def point_deviation(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per point: Mahalanobis distance from where the other points put it (the shape aligned
        without it), and that expected position in the input's pixels."""
        xy = np.asarray(xy, dtype=np.float64)
        z, expected = np.zeros(len(xy)), np.zeros_like(xy)
        for k in range(len(xy)):
            z[k], expected[k] = self.deviation(xy, k)
        return z, expected


def recheck(model: ShapeModel, xy: np.ndarray, confidence: np.ndarray,
            relook: Callable[[int, np.ndarray], tuple[np.ndarray, float]],
            limit: float = RECHECK_DEVIATION, share: float = RECHECK_SHARE
            ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Gross-error repair. Suspects are found worst first: the point farthest (shape deviation)
    from where the points not yet suspected put it, while that is above ``limit``, for at most
    ``share`` of the points (at least one). Each suspect is then judged by the unsuspected
    points: cleared if they accept it as it is, else looked at again from where they put it
    (``relook(k, start) -> (point, confidence)``), the new point kept only if they accept it
    and the network is at least as sure of it as of the old one. Returns the points, their
    confidences and the indices of the points moved."""
    xy, conf = np.array(xy, dtype=np.float64), np.array(confidence, dtype=np.float64)
    suspect = np.zeros(len(xy), dtype=bool)
    order: list[int] = []
    for _ in range(min(max(1, int(share * len(xy))), len(xy) - 3)):  # three points at least stay trusted
        z = {int(k): model.deviation(xy, k, ~suspect)[0] for k in np.flatnonzero(~suspect)}
        k = max(z, key=z.__getitem__)
        if z[k] <= limit:
            break
        suspect[k] = True
        order.append(k)
    moved: list[int] = []
    for k in order:
        z, start = model.deviation(xy, k, ~suspect)
        if z > limit:
            point, c = relook(k, start)
            trial = xy.copy()
            trial[k] = point
            if c < conf[k] or model.deviation(trial, k, ~suspect)[0] > limit:
                continue
            xy, conf[k] = trial, c
            moved.append(k)
        suspect[k] = False
    return xy, conf, moved


def rechecked_text(names: list[str]) -> str:
    """What the re-check did, for a note or a status line ("" when it moved nothing)."""
    if not names:
        return ""
    one = len(names) == 1
    return (f"{', '.join(names)}: looked at again where the other landmarks put {'it' if one else 'them'}"
            f" (far from there at first); check {'it' if one else 'them'}")


@dataclass
class Verdict:
    """Image-level plausibility of one detection."""

    plausible: bool
    score: float  # squared Mahalanobis distance of the configuration
    tail: float  # share of held-out training shapes at least as far
    mean_confidence: float  # the network's own, mean over points
    reasons: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"plausible": self.plausible, "shape_score": round(self.score, 3),
                "shape_tail": round(self.tail, 4), "mean_confidence": round(self.mean_confidence, 4),
                "reasons": list(self.reasons)}


def warning_text(card: dict[str, Any], plausibility: dict[str, Any]) -> str:
    """``does not look like <anatomy> for model <name> (<reasons>)``."""
    anatomy = card.get("anatomy", "the images it was trained on")
    return (f"does not look like {anatomy} for model {card.get('name', '?')} "
            f"({'; '.join(plausibility['reasons'])})")


def verdict(model: ShapeModel, xy: np.ndarray, raw_confidence: np.ndarray) -> Verdict:
    """Plausible unless the shape scores beyond the card's threshold or the mean confidence is
    below its floor (both chosen on validation images when the model was fitted)."""
    limits = model.entry["thresholds"]
    score, conf = model.score(xy), float(np.mean(raw_confidence))
    tail = model.tail(score)
    reasons = []
    if score > limits["shape_score"]:
        reasons.append(f"landmark configuration unlike the training shapes (score {score:.0f}, "
                       f"limit {limits['shape_score']:.0f})")
    if conf < limits["mean_confidence"]:
        reasons.append(f"mean confidence {conf:.2f} below {limits['mean_confidence']:.2f}")
    return Verdict(not reasons, score, tail, conf, reasons)


def thresholds(model: ShapeModel, val_xy: np.ndarray, val_conf: np.ndarray) -> dict[str, Any]:
    """Verdict limits from validation detections (never test sets): a shape score above every
    validation detection and the held-out training shapes' 99th percentile, with a margin of
    ``SCORE_MARGIN``; a mean-confidence floor of ``CONFIDENCE_MARGIN`` times the lowest
    validation image's."""
    scores = [model.score(x) for x in val_xy]
    means = np.asarray(val_conf, dtype=np.float64).mean(axis=1)
    base = max(max(scores), float(np.percentile(model.reference, 99)))
    return {"shape_score": SCORE_MARGIN * base, "mean_confidence": CONFIDENCE_MARGIN * float(means.min()),
            "validation_images": len(scores), "validation_max_score": float(max(scores)),
            "validation_min_mean_confidence": float(means.min())}




def shape_entry(train_xy: np.ndarray, val_xy: np.ndarray, val_conf: np.ndarray) -> dict[str, Any]:
    """Model-card entry: the shape model of the training annotations and the verdict limits
    from the model's detections on its validation images (raw confidences)."""
    model = ShapeModel.fit(train_xy)
    return {**model.entry, "thresholds": thresholds(model, val_xy, val_conf)}
