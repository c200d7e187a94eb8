"""Landmark files: Slicer markups JSON (.mrk.json, LPS mm), legacy .fcsv, and CSV."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .atomic import atomic_write
from .landmarks import Landmarks

SCHEMA_URL = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
              "Resources/Schema/markups-schema-v1.0.3.json#")
LOW_CONFIDENCE = 0.5


def describe(description: str, confidence: float) -> str:
    return f"{description} (confidence {confidence:.2f})"


def markups_dict(lm: Landmarks, name: str = "Landmarks",
                 corrected: Sequence[bool] | None = None) -> dict[str, Any]:
    """Slicer markups JSON document for one fiducial list (positions in LPS millimetres)."""
    corrected = list(corrected) if corrected is not None else [False] * len(lm)
    status = position_status(lm)
    points = [{
        "id": str(i + 1), "label": lm.names[i], "description": describe(lm.descriptions[i], lm.confidence[i]),
        "associatedNodeID": "", "position": [float(v) for v in np.nan_to_num(lm.lps[i])],
        "orientation": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0],
        "selected": True, "locked": False, "visibility": True, "positionStatus": status[i],
    } for i in range(len(lm))]
    return {
        "@schema": SCHEMA_URL,
        "markups": [{
            "type": "Fiducial", "coordinateSystem": "LPS", "coordinateUnits": "mm", "name": name,
            "locked": False, "fixedNumberOfControlPoints": True, "labelFormat": "%N-%d",
            "lastUsedControlPointNumber": len(lm), "controlPoints": points, "measurements": [],
            "display": {"visibility": True, "opacity": 1.0, "glyphType": "Sphere3D",
                        "glyphScale": 1.5, "textScale": 2.5, "pointLabelsVisibility": True},
            # Extra fields (allowed by the schema, ignored by Slicer's reader).
            "medsapiens": {"model": lm.meta.get("model", ""), "image": lm.meta.get("image", ""),
                           "confidence": [float(c) for c in lm.confidence],
                           "corrected": [bool(c) for c in corrected],
                           "pixels": [[float(v) for v in p] if np.isfinite(p).all() else None for p in lm.xy],
                           **_checks(lm)},
        }],
    }


def position_status(lm: Landmarks) -> list[str]:
    """Slicer's position status per point: "defined", or the clinician's "missing" (Skip
    placement) / "undefined" (Unset position) for a point without coordinates (NaN)."""
    given = lm.meta.get("position_status") or []
    return [("defined" if np.isfinite(lm.lps[i]).all() else
             given[i] if i < len(given) and given[i] in ("missing", "undefined") else "missing")
            for i in range(len(lm))]


def _checks(lm: Landmarks) -> dict[str, Any]:
    """The plausibility verdict and per-point shape deviations, when the model has a shape model."""
    out: dict[str, Any] = {}
    if "plausibility" in lm.meta:
        out["plausibility"] = lm.meta["plausibility"]
    if "shape_deviation" in lm.meta:
        out["shape_deviation"] = [round(float(z), 3) for z in lm.meta["shape_deviation"]]
    if "model_pixels" in lm.meta:  # the model's own points: a site layer is fitted to them
        out["model_pixels"] = np.round(np.asarray(lm.meta["model_pixels"], float), 3).tolist()
        out["model_ref"] = lm.meta.get("model_ref", "")
    if "raw_confidence" in lm.meta:  # the network's own confidence: a site refits calibration from it
        out["model_confidence"] = np.round(np.asarray(lm.meta["raw_confidence"], float), 5).tolist()
    if "spacing_mm" in lm.meta:
        out["spacing_mm"] = [float(v) for v in lm.meta["spacing_mm"]]
    return out


def write_text(path: str | Path, text: str, private: bool = False) -> Path:
    with atomic_write(path, private) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_markups(path: str | Path, lm: Landmarks, name: str = "Landmarks",
                  corrected: Sequence[bool] | None = None) -> Path:
    return write_text(path, json.dumps(markups_dict(lm, name, corrected), indent=2) + "\n")


def write_fcsv(path: str | Path, lm: Landmarks) -> Path:
    """Legacy Slicer fiducial CSV (version 4.11 header, LPS)."""
    out = io.StringIO()
    out.write("# Markups fiducial file version = 4.11\n# CoordinateSystem = LPS\n"
              "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n")
    w = csv.writer(out, lineterminator="\n")
    for i in range(len(lm)):
        x, y, z = lm.lps[i]
        w.writerow([i + 1, f"{x:.4f}", f"{y:.4f}", f"{z:.4f}", 0, 0, 0, 1, 1, 1, 0, lm.names[i],
                    describe(lm.descriptions[i], lm.confidence[i]), ""])
    return write_text(path, out.getvalue())


def write_csv(path: str | Path, lm: Landmarks) -> Path:
    """One row per landmark: name, pixel x/y, LPS mm, confidence."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["name", "description", "x_px", "y_px", "L_mm", "P_mm", "S_mm", "confidence"])
    for i in range(len(lm)):  # a point marked missing has empty coordinate cells
        w.writerow([lm.names[i], lm.descriptions[i], *(_cell(v, 3) for v in lm.xy[i]),
                    *(_cell(v, 4) for v in lm.lps[i]), f"{lm.confidence[i]:.4f}"])
    return write_text(path, out.getvalue())


def _cell(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if np.isfinite(value) else ""


def read_markups(path: str | Path) -> dict[str, Any]:
    """Labels, LPS positions (K, 3; NaN where the position status is not "defined"), position
    statuses, descriptions and our extra fields of a .mrk.json file."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        mk = doc["markups"][0]
        points = mk["controlPoints"]
        pos = np.array([p["position"] for p in points], dtype=np.float64).reshape(-1, 3)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError) as err:
        raise ValueError(f"{path}: not a readable Slicer markups file ({err})") from None
    if mk.get("coordinateSystem", "LPS") == "RAS":
        pos = pos * [-1, -1, 1]
    status = [p.get("positionStatus", "defined") for p in points]
    pos[[s != "defined" for s in status]] = np.nan
    return {"labels": [p.get("label", "") for p in points], "lps": pos, "status": status,
            "descriptions": [p.get("description", "") for p in points],
            "extra": mk.get("medsapiens", {})}
