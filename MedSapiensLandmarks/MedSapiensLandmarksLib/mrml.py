"""MRML side of the core (real Slicer or slicer-core): volume nodes in, markups nodes out.

Corrections are tracked on ``PointModifiedEvent`` (a drag in a view, an edit in the Markups
module's table, a script): a point whose position differs from what the model put there is
marked corrected and shown as verified (the confident colour). The flags live in the node
(attribute, and " [corrected]" in the point description, so they survive saving the node as
.mrk.json as well as saving the scene), and re-detection never moves a corrected or locked
point. A new markups node is put under the volume's parent transform, so points and image
move together.
"""
from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np
import slicer
import vtk

from .imageio import (DICOM_SPACING_TAGS, PLAIN_FORMATS, Radiograph, check_spacing, dicom_tag_spacing,
                      slice_volume)
from .landmarks import Landmarks
from .markups import LOW_CONFIDENCE, describe
from .shape import rechecked_text

ATTR_DETECTED = "MedSapiens.DetectedRAS"
ATTR_CORRECTED = "MedSapiens.Corrected"
ATTR_CONFIDENCE = "MedSapiens.Confidence"
ATTR_MODEL = "MedSapiens.Model"
VOLUME_ROLE = "MedSapiensVolume"  # node reference: the volume whose points a markups node holds
ATTR_SPACING = "MedSapiens.Spacing"  # on a volume: JSON {"known": bool, "source": str}
ATTR_ERROR_MODEL = "MedSapiens.ErrorModel"  # JSON when confidences are calibrated probabilities
ATTR_PLAUSIBILITY = "MedSapiens.Plausibility"  # the image-level verdict (JSON), when the model has one
ATTR_TRACING = "MedSapiens.TracingLines"  # JSON {line name: line node ID}
ATTR_MODEL_POINTS = "MedSapiens.ModelPixels"  # JSON {"ref": base model, "pixels": the model's own points, "raw_confidence"}
CORRECTED_TAG = " [corrected]"
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])
RADIOGRAPH_VOLUME_CLASSES = ("vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode")
CONFIDENT_COLOUR = (0.2, 0.85, 0.3)  # "selected" colour of the markups display node
DOUBTFUL_COLOUR = (1.0, 0.25, 0.2)  # unselected: low-confidence points
TRACING_COLOUR = (0.25, 0.65, 1.0)


def ijk_to_ras(volume_node: Any) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def volume_to_radiograph(volume_node: Any, slice_index: int | None = None, axis: int = 2) -> Radiograph:
    """Volume node (scalar or RGB vector) -> 2D `Radiograph` with its exact LPS geometry."""
    arr = slicer.util.arrayFromVolume(volume_node)  # K, J, I[, C]
    m = ijk_to_ras(volume_node)
    cols, org = m[:3, :3] * LPS_TO_RAS[:, None], m[:3, 3] * LPS_TO_RAS
    pixels, a = slice_volume(volume_node.GetName(), np.array(arr), cols, org, slice_index, axis)
    spacing = volume_spacing(volume_node)
    return Radiograph(pixels, a, spacing["known"], volume_node.GetName(), spacing["source"])


def volume_spacing(volume_node: Any) -> dict[str, Any]:
    """The volume's pixel spacing and where it came from: ``known``, ``mm`` (x, y) and ``source``.

    Slicer gives every PNG/JPEG/BMP/TIFF 1 mm/pixel: the spacing of a volume read from such a
    file is unknown until the user types it or calibrates it on a ruler (`set_volume_spacing`).
    """
    mm = tuple(float(v) for v in volume_node.GetSpacing()[:2])
    stated = volume_node.GetAttribute(ATTR_SPACING)
    if stated:
        return {"mm": mm, **json.loads(stated)}
    storage = volume_node.GetStorageNode()
    name = storage.GetFileName() if storage is not None else None
    if name and any(str(name).lower().endswith(ext) for ext in PLAIN_FORMATS):
        return {"mm": mm, "known": False, "source": f"none in the {name.rsplit('.', 1)[-1].upper()} file"}
    if volume_node.GetAttribute("DICOM.instanceUIDs"):
        return {"mm": mm, "known": True, "source": "DICOM (as loaded by Slicer)"}
    return {"mm": mm, "known": True, "source": "file header" if name else "scene"}


def dicom_spacing(volume_node: Any, instance_value: Callable[[str, str], str]) -> dict[str, Any] | None:
    """The spacing a radiograph's DICOM tags give (`imageio.dicom_tag_spacing`), read through
    ``instance_value(uid, "gggg,eeee")`` as Slicer's ``dicomDatabase.instanceValue``; ``known``
    False when no tag gives it. None for a volume not loaded from DICOM."""
    uids = (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split()
    if not uids:
        return None
    values = (instance_value(uids[0], tag.replace("|", ",")) or "" for tag in DICOM_SPACING_TAGS)
    mm, source = dicom_tag_spacing(*values)
    return {"known": mm is not None, "mm": mm, "source": source}


def apply_dicom_spacing(scene: Any, volume_node: Any, instance_value: Callable[[str, str], str]) -> None:
    """Give a DICOM radiograph the spacing its tags mean (once: a spacing the user set stays)."""
    if volume_node.GetAttribute(ATTR_SPACING):
        return
    found = dicom_spacing(volume_node, instance_value)
    if found is None:
        return
    if found["known"]:
        set_volume_spacing(scene, volume_node, found["mm"], found["source"])
    else:
        volume_node.SetAttribute(ATTR_SPACING, json.dumps({"known": False, "source": found["source"]}))


def spacing_text(volume_node: Any) -> str:
    """One line for the panel: the spacing with its source, or why millimetres are not shown."""
    s = volume_spacing(volume_node)
    if not s["known"]:
        return f"Pixel spacing unknown ({s['source']}): type it or calibrate on the ruler; no mm values until then"
    sx, sy = s["mm"]
    value = f"{sx:.4g} mm/pixel" if abs(sx - sy) <= 1e-6 * max(sx, sy) else f"{sx:.4g} x {sy:.4g} mm/pixel"
    return f"{value} (from {s['source']})"


def set_volume_spacing(scene: Any, volume_node: Any, mm: float | tuple[float, float], source: str = "user") -> None:
    """Give the volume an in-plane spacing of ``mm`` (one value, or columns x rows; origin and
    directions kept), and move its landmark list's points with the pixels they sit on (not
    corrections)."""
    sx, sy = (check_spacing(v) for v in ((mm, mm) if np.isscalar(mm) else mm))
    node = volume_landmarks(scene, volume_node)
    before = ijk_to_ras(volume_node)
    old = volume_node.GetSpacing()
    volume_node.SetSpacing(sx, sy, old[2])
    after = ijk_to_ras(volume_node)
    volume_node.SetAttribute(ATTR_SPACING, json.dumps({"known": True, "source": source}))
    if node is None or node.GetNumberOfControlPoints() == 0:
        return
    move = after @ np.linalg.inv(before)

    def moved(ras: np.ndarray) -> np.ndarray:
        return (np.c_[ras, np.ones(len(ras))] @ move.T)[:, :3]

    was = node.StartModify()
    present = defined(node)
    for i, p in enumerate(moved(np.array([node.GetNthControlPointPosition(i)
                                          for i in range(node.GetNumberOfControlPoints())]))):
        if present[i]:  # a missing or unset point keeps its status
            node.SetNthControlPointPosition(i, *p)
    detected = node.GetAttribute(ATTR_DETECTED)
    if detected:
        node.SetAttribute(ATTR_DETECTED, json.dumps(moved(np.array(json.loads(detected))).round(6).tolist()))
    node.EndModify(was)


def ruler_spacing(volume_node: Any, ras_a: Any, ras_b: Any, distance_mm: float) -> float:
    """mm per pixel from two points placed on the radiograph's ruler ``distance_mm`` apart."""
    if not np.isfinite(distance_mm) or distance_mm <= 0:
        raise ValueError(f"ruler distance must be a positive number of mm, got {distance_mm}")
    inv = np.linalg.inv(ijk_to_ras(volume_node))
    ijk = [(inv @ [*map(float, p), 1.0])[:2] for p in (ras_a, ras_b)]
    pixels = float(np.linalg.norm(ijk[0] - ijk[1]))
    if pixels < 1.0:
        raise ValueError("the two ruler points are less than one pixel apart")
    return distance_mm / pixels


def owner_volume(node: Any) -> Any | None:
    """The volume whose points a landmark list holds (None: not bound to a volume)."""
    return node.GetNodeReference(VOLUME_ROLE) if node is not None else None


def check_owner(node: Any, volume_node: Any) -> None:
    """Refuse to mix patients: a landmark list bound to another volume is never read or written
    as this volume's points."""
    owner = owner_volume(node)
    if volume_node is not None and owner is not None and owner is not volume_node:
        raise ValueError(f"landmark list {node.GetName()!r} holds the points of {owner.GetName()!r}, "
                         f"not of {volume_node.GetName()!r}")


def volume_landmarks(scene: Any, volume_node: Any) -> Any | None:
    """The landmark list of this volume (the one Detect wrote for it), if any."""
    if volume_node is None:
        return None
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLMarkupsFiducialNode")
        if owner_volume(node) is volume_node:
            return node
    return None


def defined(node: Any) -> list[bool]:
    """Per point: is its position defined (not marked missing or unset by the clinician)?"""
    return [node.GetNthControlPointPositionStatus(i) == node.PositionDefined
            for i in range(node.GetNumberOfControlPoints())]


def positions_ras(node: Any) -> np.ndarray:
    """(K, 3) RAS positions; NaN rows for points marked missing or whose position is unset."""
    n = node.GetNumberOfControlPoints()
    ras = np.array([node.GetNthControlPointPosition(i) for i in range(n)], dtype=np.float64).reshape(n, 3)
    ras[~np.array(defined(node), dtype=bool).reshape(n)] = np.nan
    return ras


def corrected_flags(node: Any) -> list[bool]:
    """Corrected flag per point: the node attribute, else the description tags (after a load)."""
    n = node.GetNumberOfControlPoints()
    text = node.GetAttribute(ATTR_CORRECTED)
    if text:
        flags = [c == "1" for c in text.split(",")]
        if len(flags) == n:
            return flags
    return [node.GetNthControlPointDescription(i).endswith(CORRECTED_TAG) for i in range(n)]


def _set_corrected(node: Any, flags: list[bool]) -> None:
    """Store the flags; a corrected point is verified by the user, so it shows as confident."""
    was = node.StartModify()
    node.SetAttribute(ATTR_CORRECTED, ",".join("1" if f else "0" for f in flags))
    for i, flag in enumerate(flags):
        desc = node.GetNthControlPointDescription(i).removesuffix(CORRECTED_TAG)
        node.SetNthControlPointDescription(i, desc + (CORRECTED_TAG if flag else ""))
        if flag:
            node.SetNthControlPointSelected(i, True)
    node.EndModify(was)


def record_corrections(node: Any, tolerance_mm: float = 1e-4) -> list[int]:
    """Mark points moved away from the detected position; returns newly corrected indices."""
    detected = node.GetAttribute(ATTR_DETECTED)
    if not detected:
        return []
    ref = np.array(json.loads(detected)).reshape(-1, 3)
    now = positions_ras(node)
    if len(ref) != len(now):
        return []
    flags = corrected_flags(node)
    moved = ~np.isfinite(now).all(1) | (np.linalg.norm(np.nan_to_num(now - ref), axis=1) > tolerance_mm)
    new = [i for i in np.flatnonzero(moved) if not flags[i]]
    if new:
        _set_corrected(node, [f or bool(m) for f, m in zip(flags, moved)])
    return [int(i) for i in new]


def observe_corrections(node: Any) -> int:
    """Record corrections each time a point moves (drag, table edit); returns the observer tag."""
    return node.AddObserver(node.PointModifiedEvent, lambda caller, event: record_corrections(caller))


def landmarks_to_node(scene: Any, lm: Landmarks, node: Any | None = None, name: str = "Landmarks",
                      volume_node: Any | None = None) -> Any:
    """Create or update a fixed-size fiducial list, one named point per landmark.

    Corrected, locked and missing points keep their position; the others move to the new
    detection. Low-confidence points are left unselected, so they show in the warning colour.
    A node that holds another volume's points is refused.
    """
    check_owner(node, volume_node)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        node.CreateDefaultDisplayNodes()
        if volume_node is not None:  # points are in the volume's local frame: same parent
            node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    k = len(lm)
    ras = lm.lps * LPS_TO_RAS
    if node.GetNumberOfControlPoints() != k:
        node.SetFixedNumberOfControlPoints(False)
        node.RemoveAllControlPoints()
        node.RemoveAttribute(ATTR_CORRECTED)
        for i in range(k):
            node.AddControlPoint(vtk.vtkVector3d(*ras[i]), lm.names[i])
    flags = corrected_flags(node)
    present = defined(node)
    keep = [flags[i] or node.GetNthControlPointLocked(i) or not present[i] for i in range(k)]
    was = node.StartModify()
    for i in range(k):
        if not keep[i]:
            node.SetNthControlPointPosition(i, *ras[i])
        node.SetNthControlPointLabel(i, lm.names[i])
        node.SetNthControlPointDescription(i, describe(lm.descriptions[i], lm.confidence[i]))
        node.SetNthControlPointSelected(i, bool(lm.confidence[i] >= LOW_CONFIDENCE))
    _set_corrected(node, flags)
    node.SetFixedNumberOfControlPoints(True)
    node.SetAttribute(ATTR_DETECTED, json.dumps(np.nan_to_num(positions_ras(node)).round(6).tolist()))
    node.SetAttribute(ATTR_CONFIDENCE, json.dumps([round(float(c), 4) for c in lm.confidence]))
    node.SetAttribute(ATTR_MODEL, str(lm.meta.get("model", "")))
    node.SetAttribute(ATTR_ERROR_MODEL, json.dumps(lm.meta.get("error_model")))
    if "model_pixels" in lm.meta:
        own = {"ref": lm.meta.get("model_ref", ""), "pixels": np.round(lm.meta["model_pixels"], 3).tolist()}
        if "raw_confidence" in lm.meta:
            own["raw_confidence"] = np.round(np.asarray(lm.meta["raw_confidence"], float), 5).tolist()
        node.SetAttribute(ATTR_MODEL_POINTS, json.dumps(own))
    if "plausibility" in lm.meta:
        node.SetAttribute(ATTR_PLAUSIBILITY, json.dumps(lm.meta["plausibility"]))
    else:
        node.RemoveAttribute(ATTR_PLAUSIBILITY)
    if volume_node is not None:
        node.SetNodeReferenceID(VOLUME_ROLE, volume_node.GetID())
    node.EndModify(was)
    display = node.GetDisplayNode()
    if display is not None:
        display.SetSelectedColor(*CONFIDENT_COLOUR)
        display.SetColor(*DOUBTFUL_COLOUR)
    return node


def first_radiograph_volume(scene: Any) -> Any | None:
    """The first grey or colour image volume of the scene (never a label map, DTI or DWI)."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
        if node.GetClassName() in RADIOGRAPH_VOLUME_CLASSES:
            return node
    return None


def table_rows(node: Any) -> list[dict[str, Any]]:
    """Rows for the landmark table, least confident first: index, name, confidence, corrected,
    missing (marked missing or unset by the clinician)."""
    conf = json.loads(node.GetAttribute(ATTR_CONFIDENCE) or "[]")
    flags, present = corrected_flags(node), defined(node)
    rows = [{"index": i, "name": node.GetNthControlPointLabel(i),
             "confidence": conf[i] if i < len(conf) else float("nan"), "corrected": flags[i],
             "missing": not present[i]}
            for i in range(node.GetNumberOfControlPoints())]
    return sorted(rows, key=lambda r: (r["confidence"], r["index"]))


def plausibility_warning(node: Any) -> str:
    """The verdict's warning for the points of this node ("" when plausible or unchecked)."""
    text = node.GetAttribute(ATTR_PLAUSIBILITY) if node is not None else None
    return json.loads(text).get("warning", "") if text else ""


def rechecked_note(node: Any) -> str:
    """What a detection's shape re-check moved, for the status line ("" when it moved nothing)."""
    text = node.GetAttribute(ATTR_PLAUSIBILITY) if node is not None else None
    note = rechecked_text(json.loads(text).get("rechecked", []) if text else [])
    return f" {note}." if note else ""


def update_tracing(scene: Any, node: Any, lines: dict[str, tuple[str, str]], visible: bool) -> list[Any]:
    """Locked line nodes between named points of ``node`` (created once, then moved with the
    points), shown or hidden; returns them. Lines whose points the node lacks are skipped."""
    labels = [node.GetNthControlPointLabel(i) for i in range(node.GetNumberOfControlPoints())]
    ras = positions_ras(node)
    known = json.loads(node.GetAttribute(ATTR_TRACING) or "{}")
    if not visible and not known:  # nothing drawn yet: hiding creates nothing
        return []
    out = []
    for name, (a, b) in lines.items():
        if a not in labels or b not in labels:
            continue
        line = scene.GetNodeByID(known.get(name, "")) if known.get(name) else None
        if line is None:
            line = scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", f"{node.GetName()} {name}")
            line.CreateDefaultDisplayNodes()
            line.SetAndObserveTransformNodeID(node.GetTransformNodeID())
            line.SetLocked(True)
            known[name] = line.GetID()
        was = line.StartModify()
        if line.GetNumberOfControlPoints() != 2:
            line.RemoveAllControlPoints()
            line.AddControlPoint(vtk.vtkVector3d(*ras[labels.index(a)]), a)
            line.AddControlPoint(vtk.vtkVector3d(*ras[labels.index(b)]), b)
        else:
            line.SetNthControlPointPosition(0, *ras[labels.index(a)])
            line.SetNthControlPointPosition(1, *ras[labels.index(b)])
        line.EndModify(was)
        display = line.GetDisplayNode()
        if display is not None:  # a thin line in its own colour; no end glyphs over the landmarks
            display.SetVisibility(visible)
            display.SetPropertiesLabelVisibility(False)
            display.SetPointLabelsVisibility(False)
            display.SetUseGlyphScale(True)
            display.SetGlyphScale(0.01)
            display.SetCurveLineSizeMode(display.UseLineDiameter)  # not relative to the glyphs
            display.SetLineDiameter(0.6)
            display.SetSelectedColor(*TRACING_COLOUR)
            display.SetColor(*TRACING_COLOUR)
        out.append(line)
    node.SetAttribute(ATTR_TRACING, json.dumps(known))
    return out
