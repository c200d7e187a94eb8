"""An adapted model: a base model's graphs + a site convention layer fitted on corrected cases.

The folder holds only ``model.json`` (``"base"`` names the model whose graphs it runs), so it
adds nothing to the base model's size; refitting replaces it in one step (never half-written).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from .adaptation import DEFAULT_SHRINK, SiteLayer, default_frame, fit_layer, leave_one_out, own_errors, withhold
from .atomic import atomic_write
from .calibration import apply as calibrated
from .calibration import fit_scale
from .cards import ALIASES, model_names, read_card, resolve
from .datasets import Case
from .detector import Detector
from .export import read_index
from .imageio import ImageError, read_image
from .markups import read_markups

SITE_FOLDER = "site-model"  # beside the cases of an export folder


class SiteFit(NamedTuple):
    """What an Export's refit gives: the adapted model's card, its number of cases and the
    widening of its confidence to the site's errors (1.0: the base calibration holds)."""

    card: Path
    cases: int
    scale: float
    withheld: bool = False


def base_model(model: str) -> str:
    """The model whose detections a layer is fitted to: an adapted model's base, else itself."""
    return read_card(resolve(model)).get("base", model)


@dataclass
class SiteCases:
    """A site's corrected cases as a layer sees them: the model's own points (pixels) and raw
    confidence (None: not recorded), the clinician's points (NaN: marked missing), spacing."""
    preds: list[np.ndarray] = field(default_factory=list)
    truths: list[np.ndarray] = field(default_factory=list)
    spacings: list[tuple[float, float]] = field(default_factory=list)
    raws: list[np.ndarray | None] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)

    def add(self, case_id: str, pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float],
            raw: np.ndarray | None) -> None:
        self.ids.append(case_id)
        self.preds.append(np.asarray(pred, dtype=np.float64))
        self.truths.append(np.asarray(truth, dtype=np.float64))
        self.spacings.append(tuple(spacing))
        self.raws.append(None if raw is None else np.asarray(raw, dtype=np.float64))

    def without(self, ids: Sequence[str]) -> "SiteCases":
        kept = SiteCases()
        for i, case_id in enumerate(self.ids):
            if case_id not in ids:
                kept.add(case_id, self.preds[i], self.truths[i], self.spacings[i], self.raws[i])
        return kept


@dataclass
class Adaptation:
    layer: SiteLayer
    calibration: dict[str, Any] | None  # the model's calibration with the site's error scale

    def confidence_note(self, model: str = "base model") -> str:
        """Which calibration the adapted card uses, for its ``site_layer.confidence``."""
        if self.calibration is None:
            return f"the {model}'s calibration, not refitted on the site's cases"
        after = ("with the layer withheld" if self.layer.withheld
                 else "after the layer (each case adapted to the others)")
        cases = f"the errors of {len(self.calibration['site_cases'])} site cases {after}"
        if self.calibration["site_scale"] > 1.0:
            return f"the {model}'s calibration widened x{self.calibration['site_scale']:.2f} to {cases}"
        return f"the {model}'s calibration: {cases} are within it, so not widened"


def adapt_cases(site: SiteCases, names: Sequence[str], calibration: dict[str, Any] | None,
                frame: str | None = None, shrink: float = DEFAULT_SHRINK, prior: SiteLayer | None = None) -> Adaptation:
    """The layer of the site's cases, and the calibration widened to the site: the multiplier of
    the error scale from each case's error once adapted to the *other* cases (an honest error,
    unlike the case's own), on the cases whose raw confidence was recorded. Widened only: a few
    cases never make the confidence surer than its validation said (docs/benchmarks.md, round 7).
    The same errors decide whether the layer is withheld (`adaptation.withhold`)."""
    if prior is not None:  # the model's own layer goes on with its frame and shrinkage
        frame, shrink = prior.frame, prior.shrink
    frame = frame or default_frame(names)
    layer = fit_layer(site.preds, site.truths, site.spacings, names, frame, shrink, site.ids, prior=prior)
    errors = leave_one_out(site.preds, site.truths, site.spacings, names, frame, shrink, prior)
    own = own_errors(site.preds, site.truths, site.spacings)
    layer.withheld = withhold(errors, own)
    errors = own if layer.withheld else errors
    use = [i for i, raw in enumerate(site.raws) if raw is not None]
    if not calibration or not use:
        return Adaptation(layer, None)
    base = {k: v for k, v in calibration.items() if not k.startswith("site_")}
    errors = errors[use]
    prob = calibrated(base, np.stack([site.raws[i] for i in use]))
    ok = np.isfinite(errors)
    scale = max(1.0, fit_scale(prob[ok], errors[ok], float(base.get("tail_dof", 1e6)), float(base["radius_mm"])))
    return Adaptation(layer, {**base, "site_scale": round(scale, 4), "site_points": int(ok.sum()),
                              "site_cases": [site.ids[i] for i in use]})


def fit_site(det: Detector, cases: Sequence[Case], frame: str | None = None,
             shrink: float = DEFAULT_SHRINK) -> tuple[Adaptation, list[str]]:
    """Fit the layer (and the calibration) of ``det``'s detections without any layer to the
    cases; returns it and one warning per case left out (an unreadable image)."""
    if not cases:
        raise ValueError("no corrected cases to adapt to")
    site, det.site = det.site, None
    found, warnings = SiteCases(), []
    try:
        for case in cases:
            if len(case.xy) != len(det.names):
                raise ValueError(f"case {case.case_id} has {len(case.xy)} landmarks, the model "
                                 f"{len(det.names)}: adapt needs the model's landmark set")
            try:
                image = read_image(case.image, spacing=case.spacing)
            except ImageError as err:
                warnings.append(f"warning: case {case.case_id} left out: {err}")
                continue
            lm = det.detect(image)
            found.add(case.case_id, lm.xy, case.xy, image.spacing, lm.meta["raw_confidence"])
    finally:
        det.site = site
    if not found.ids:
        raise ValueError("none of the cases could be read: nothing to adapt to")
    return adapt_cases(found, det.names, det.card.get("calibration"), frame, shrink), warnings


def refit_own_layer(card_path: Path, cases: Sequence[Case], like: dict[str, Any]) -> SiteLayer:
    """A model fine-tuned from an adapted one ends adapted too: the layer (frame and shrinkage
    of ``like``, the old layer) refitted on the new model's own detections of ``cases``, stored
    in its card (the layer only or both: docs/benchmarks.md, round 6)."""
    det = Detector.load(card_path, device="cpu", backend="torch")
    adapted, _warnings = fit_site(det, cases, like.get("frame"), float(like.get("shrink", DEFAULT_SHRINK)))
    card = read_card(card_path)
    card["site_layer"] = {**adapted.layer.to_json(),
                          "confidence": adapted.confidence_note("fine-tuned model")}
    if adapted.calibration is not None:
        card["calibration"] = adapted.calibration
    with atomic_write(card_path) as tmp:
        tmp.write_text(json.dumps(card, indent=2) + "\n")
    return adapted.layer


def write_site_model(base: str, adapted: Adaptation, out: str | Path) -> Path:
    """``out/model.json``: the base card with the layer (and the site's calibration) and the
    base named (graphs not copied)."""
    layer = adapted.layer
    base_path = resolve(base)
    card = read_card(base_path)
    shipped = ALIASES.get(str(base), str(base))
    card["base"] = shipped if shipped in model_names() else str(base_path.resolve())  # a name travels
    card["base_name"] = card.get("name", "")  # the detections' model (`Landmarks.meta["model_ref"]`)
    card["name"] = f"{card.get('name', 'model')} adapted to {len(layer.cases)} site cases"
    card["site_layer"] = {**layer.to_json(), "confidence": adapted.confidence_note()}
    if adapted.calibration is not None:
        card["calibration"] = adapted.calibration
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "model.json").write_text(json.dumps(card, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "model.json"


def export_cases(root: str | Path, base_ref: str, names: Sequence[str]) -> SiteCases:
    """An export folder's cases detected by ``base_ref``, from their markups alone (they keep the
    model's own points, its raw confidence and the pixel spacing): no image is read, nothing is
    detected again."""
    root = Path(root)
    index = read_index(root)
    found = SiteCases()
    if index["landmarks"] != list(names):
        return found
    for entry in index["cases"]:
        extra = read_markups(root / entry["markups"])["extra"]
        if extra.get("model_ref") != base_ref or "model_pixels" not in extra or "spacing_mm" not in extra:
            continue
        truth = np.array([p if p is not None else [np.nan, np.nan] for p in extra["pixels"]], dtype=np.float64)
        found.add(entry["id"], extra["model_pixels"], truth, extra["spacing_mm"], extra.get("model_confidence"))
    return found


def refit_site(root: str | Path, model: str, names: Sequence[str]) -> SiteFit | None:
    """After an Export: refit ``root/site-model`` from every case of ``model``'s base in the
    export folder (added to the base's own layer, if it has one); returns the adapted model
    (None: no new case)."""
    base = base_model(model)
    card = read_card(resolve(base))
    found = export_cases(root, card.get("name", base), names)
    # a fine-tuned model's own layer (of its training cases) is added to, never replaced
    prior = SiteLayer.from_json(card["site_layer"]) if card.get("site_layer") else None
    if prior is not None:
        found = found.without(prior.cases)
    if not found.ids:
        return None
    adapted = adapt_cases(found, names, card.get("calibration"), prior=prior)
    return SiteFit(write_site_model(base, adapted, Path(root) / SITE_FOLDER), len(adapted.layer.cases),
                   (adapted.calibration or {}).get("site_scale", 1.0), adapted.layer.withheld)
