"""Site convention layer: how one clinic places each landmark relative to the model, learned
from its corrected cases without training, and applied to every detection.

Per landmark, the mean of (clinician - model) over the site's cases, expressed in a frame:

- ``"mm"``: millimetres along the image axes (needs the pixel spacing);
- ``"sn"``: the S-N frame of the image's own detected sella and nasion (x along S->N, y
  perpendicular, unit |S-N|), which follows head size, rotation and pixel size.

The mean is shrunk toward zero with ``shrink`` pseudo-cases: offset = sum / (n + shrink), so a
handful of cases moves the points part of the way. Points marked missing (NaN) are left out, and
so are corrections longer than ``clip_mm`` (a failed detection put right, not a convention).

A layer is *withheld* (kept, but not applied) when the site's own cases say it does not help:
each case adapted to the others lands farther from the clinician, on average, than the model's
own point (`withhold`). A site that places the points as the model's training data did then
keeps the model's points instead of a few cases' noise (docs/benchmarks.md, round 8).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

FRAMES = ("mm", "sn")
DEFAULT_SHRINK = 0.5  # chosen on the proxy site (docs/benchmarks.md, "Site convention layer")
CLIP_MM = 10.0  # longer corrections are failures put right, not how the site places a point


@dataclass
class SiteLayer:
    frame: str
    offsets: np.ndarray  # (K, 2) in frame units
    shrink: float
    cases: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # cases per landmark (missing points left out)
    withheld: bool = False  # the site's cases say the offsets do not help: not applied

    def to_json(self) -> dict[str, Any]:
        return {"frame": self.frame, "offsets": np.round(self.offsets, 6).tolist(), "shrink": self.shrink,
                "cases": list(self.cases), "counts": list(self.counts), "withheld": self.withheld}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SiteLayer":
        return cls(data["frame"], np.asarray(data["offsets"], dtype=np.float64), float(data["shrink"]),
                   list(data.get("cases", [])), list(data.get("counts", [])), bool(data.get("withheld", False)))


def default_frame(names: Sequence[str]) -> str:
    """S-N where the landmarks have S and N (independent of pixel spacing, head size and
    rotation; as good as mm on the proxy site), else mm."""
    return "sn" if {"S", "N"} <= set(names) else "mm"


def basis(xy: np.ndarray, spacing: tuple[float, float], names: Sequence[str], frame: str) -> np.ndarray:
    """(2, 2) matrix taking a frame offset to a pixel offset for one image's points."""
    if frame == "mm":
        return np.diag([1.0 / spacing[0], 1.0 / spacing[1]])
    if frame == "sn":
        if "S" not in names or "N" not in names:
            raise ValueError("the S-N frame needs landmarks named S and N")
        e1 = xy[list(names).index("N")] - xy[list(names).index("S")]
        return np.c_[e1, [-e1[1], e1[0]]]
    raise ValueError(f"unknown frame {frame!r}; known: {', '.join(FRAMES)}")


def fit_layer(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray], spacings: Sequence[tuple[float, float]],
              names: Sequence[str], frame: str = "sn", shrink: float = 1.0,
              cases: Sequence[str] = (), clip_mm: float = CLIP_MM, prior: SiteLayer | None = None) -> SiteLayer:
    """The layer from the model's detections and the site's corrected points (pixels).

    ``prior``: a layer of the same model and frame fitted on other cases (whose detections are
    not at hand: a fine-tuned model's layer of its training cases); its cases count as if given."""
    if not preds and prior is None:
        raise ValueError("no corrected cases to adapt to")
    k = len(names)
    total, count = np.zeros((k, 2)), np.zeros(k, dtype=int)
    if prior is not None:
        if prior.frame != frame or prior.offsets.shape != (k, 2):
            raise ValueError(f"the model's own layer ({prior.frame}, {len(prior.offsets)} landmarks) "
                             f"cannot be combined with a {frame} layer of {k} landmarks")
        count += np.asarray(prior.counts or [len(prior.cases)] * k, dtype=int)
        total += prior.offsets * (count + prior.shrink)[:, None] * (count > 0)[:, None]
        cases = [*prior.cases, *cases]
    for pred, truth, spacing in zip(preds, truths, spacings):
        if pred.shape != (k, 2) or np.shape(truth) != (k, 2):
            raise ValueError(f"a case has {len(truth)} landmarks, the model {k}")
        moved = np.asarray(truth, float) - pred
        d = moved @ np.linalg.inv(basis(pred, spacing, names, frame)).T
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(d).all(1) & (np.linalg.norm(moved * spacing, axis=1) <= clip_mm)
        total[ok] += d[ok]
        count += ok
    offsets = total / (count + shrink)[:, None]
    offsets[count == 0] = 0.0
    return SiteLayer(frame, offsets, float(shrink), list(cases), count.tolist())


def apply_layer(xy: np.ndarray, spacing: tuple[float, float], names: Sequence[str], layer: SiteLayer) -> np.ndarray:
    """The detection moved by the site's offsets (pixels in, pixels out; unmoved if withheld)."""
    if layer.withheld:
        return xy
    return xy + layer.offsets @ basis(xy, spacing, names, layer.frame).T


def leave_one_out(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray], spacings: Sequence[tuple[float, float]],
                  names: Sequence[str], frame: str, shrink: float, prior: SiteLayer | None = None) -> np.ndarray:
    """(N, K) error in mm of each case after the layer fitted on the other cases (and ``prior``;
    NaN where the clinician marked the point missing): the adapted model's errors at the site."""
    out = []
    for i, (pred, truth, spacing) in enumerate(zip(preds, truths, spacings)):
        rest = [j for j in range(len(preds)) if j != i]
        moved = pred if not rest and prior is None else apply_layer(pred, spacing, names, fit_layer(
            [preds[j] for j in rest], [truths[j] for j in rest], [spacings[j] for j in rest], names, frame, shrink,
            prior=prior))
        out.append(np.linalg.norm((moved - np.asarray(truth, float)) * spacing, axis=1))
    return np.stack(out)


def own_errors(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray],
               spacings: Sequence[tuple[float, float]]) -> np.ndarray:
    """(N, K) error in mm of the model's own points (NaN where marked missing)."""
    return np.stack([np.linalg.norm((p - np.asarray(t, float)) * s, axis=1) for p, t, s in zip(preds, truths, spacings)])


def withhold(adapted: np.ndarray, own: np.ndarray) -> bool:
    """Whether the layer should not be applied: the cases' leave-one-out errors (``adapted``) are
    larger on average than the model's own on the same points (one case alone: never)."""
    ok = np.isfinite(adapted) & np.isfinite(own)
    return bool(ok.any() and adapted[ok].mean() > own[ok].mean())
