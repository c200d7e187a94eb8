"""An adapted model: a base model's graphs + a site convention layer fitted on corrected cases.

The folder holds only ``model.json`` (``"base"`` names the model whose graphs it runs), so it
adds nothing to the base model's size; refitting replaces it in one step (never half-written).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .adaptation import DEFAULT_SHRINK, SiteLayer, default_frame, fit_layer
from .atomic import atomic_write
from .cards import ALIASES, model_names, read_card, resolve
from .datasets import Case
from .detector import Detector
from .export import read_index
from .imageio import ImageError, read_image
from .markups import read_markups

SITE_FOLDER = "site-model"  # beside the cases of an export folder


def base_model(model: str) -> str:
    """The model whose detections a layer is fitted to: an adapted model's base, else itself."""
    return read_card(resolve(model)).get("base", model)


def fit_site(det: Detector, cases: Sequence[Case], frame: str | None = None,
             shrink: float = DEFAULT_SHRINK) -> tuple[SiteLayer, list[str]]:
    """Fit the layer of ``det``'s detections (without any layer) to the cases; returns it and
    one warning per case left out (an unreadable image)."""
    if not cases:
        raise ValueError("no corrected cases to adapt to")
    frame = frame or default_frame(det.names)
    site, det.site = det.site, None
    preds, truths, spacings, ids, warnings = [], [], [], [], []
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
            preds.append(det.detect(image).xy)
            truths.append(case.xy)
            spacings.append(image.spacing)
            ids.append(case.case_id)
    finally:
        det.site = site
    if not preds:
        raise ValueError("none of the cases could be read: nothing to adapt to")
    return fit_layer(preds, truths, spacings, det.names, frame, shrink, ids), warnings


def refit_own_layer(card_path: Path, cases: Sequence[Case], like: dict[str, Any]) -> SiteLayer:
    """A model fine-tuned from an adapted one ends adapted too: the layer (frame and shrinkage
    of ``like``, the old layer) refitted on the new model's own detections of ``cases``, stored
    in its card (the layer only or both: docs/benchmarks.md, round 6)."""
    det = Detector.load(card_path, device="cpu", backend="torch")
    layer, _warnings = fit_site(det, cases, like.get("frame"), float(like.get("shrink", DEFAULT_SHRINK)))
    card = read_card(card_path)
    card["site_layer"] = {**layer.to_json(), "confidence": "the fine-tuned model's calibration, not refitted"}
    with atomic_write(card_path) as tmp:
        tmp.write_text(json.dumps(card, indent=2) + "\n")
    return layer


def write_site_model(base: str, layer: SiteLayer, out: str | Path) -> Path:
    """``out/model.json``: the base card with the layer and the base named (graphs not copied)."""
    base_path = resolve(base)
    card = read_card(base_path)
    shipped = ALIASES.get(str(base), str(base))
    card["base"] = shipped if shipped in model_names() else str(base_path.resolve())  # a name travels
    card["base_name"] = card.get("name", "")  # the detections' model (`Landmarks.meta["model_ref"]`)
    card["name"] = f"{card.get('name', 'model')} adapted to {len(layer.cases)} site cases"
    card["site_layer"] = layer.to_json()
    card["site_layer"]["confidence"] = "the base model's calibration, not refitted on the site's cases"
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


def fit_site_from_export(root: str | Path, base_ref: str, names: Sequence[str], frame: str | None = None,
                         shrink: float = DEFAULT_SHRINK) -> SiteLayer | None:
    """The layer of an export folder's cases detected by ``base_ref`` (their markups keep the
    model's own points and the pixel spacing): no image is read, nothing is detected again.
    None when no such case is there."""
    root = Path(root)
    index = read_index(root)
    if index["landmarks"] != list(names):
        return None
    preds, truths, spacings, ids = [], [], [], []
    for entry in index["cases"]:
        extra = read_markups(root / entry["markups"])["extra"]
        if extra.get("model_ref") != base_ref or "model_pixels" not in extra or "spacing_mm" not in extra:
            continue
        preds.append(np.asarray(extra["model_pixels"], dtype=np.float64))
        truths.append(np.array([p if p is not None else [np.nan, np.nan] for p in extra["pixels"]], dtype=np.float64))
        spacings.append(tuple(extra["spacing_mm"]))
        ids.append(entry["id"])
    if not preds:
        return None
    return fit_layer(preds, truths, spacings, names, frame or default_frame(names), shrink, ids)


def refit_site(root: str | Path, model: str, names: Sequence[str]) -> tuple[Path, int] | None:
    """After an Export: refit ``root/site-model`` from every case of ``model``'s base in the
    export folder; returns the adapted model's card and its number of cases (None: no case)."""
    base = base_model(model)
    layer = fit_site_from_export(root, read_card(resolve(base)).get("name", base), names)
    if layer is None:
        return None
    return write_site_model(base, layer, Path(root) / SITE_FOLDER), len(layer.cases)
