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
from typing import Any

import numpy as np
import slicer
import vtk

from .imageio import Radiograph, slice_volume
from .landmarks import Landmarks
from .markups import LOW_CONFIDENCE, describe

ATTR_DETECTED = "MedSapiens.DetectedRAS"
ATTR_CORRECTED = "MedSapiens.Corrected"
ATTR_CONFIDENCE = "MedSapiens.Confidence"
ATTR_MODEL = "MedSapiens.Model"
ATTR_VOLUME = "MedSapiens.VolumeID"
ATTR_ERROR_MODEL = "MedSapiens.ErrorModel"  # JSON when confidences are calibrated probabilities
ATTR_PLAUSIBILITY = "MedSapiens.Plausibility"  # the image-level verdict (JSON), when the model has one
ATTR_TRACING = "MedSapiens.TracingLines"  # JSON {line name: line node ID}
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
    return Radiograph(pixels, a, True, volume_node.GetName())


def positions_ras(node: Any) -> np.ndarray:
    n = node.GetNumberOfControlPoints()
    return np.array([node.GetNthControlPointPosition(i) for i in range(n)]).reshape(n, 3)


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
    moved = np.linalg.norm(now - ref, axis=1) > tolerance_mm
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

    Corrected and locked points keep their position; the others move to the new detection.
    Low-confidence points are left unselected, so they show in the warning colour.
    """
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
    keep = [flags[i] or node.GetNthControlPointLocked(i) for i in range(k)]
    was = node.StartModify()
    for i in range(k):
        if not keep[i]:
            node.SetNthControlPointPosition(i, *ras[i])
        node.SetNthControlPointLabel(i, lm.names[i])
        node.SetNthControlPointDescription(i, describe(lm.descriptions[i], lm.confidence[i]))
        node.SetNthControlPointSelected(i, bool(lm.confidence[i] >= LOW_CONFIDENCE))
    _set_corrected(node, flags)
    node.SetFixedNumberOfControlPoints(True)
    node.SetAttribute(ATTR_DETECTED, json.dumps(positions_ras(node).round(6).tolist()))
    node.SetAttribute(ATTR_CONFIDENCE, json.dumps([round(float(c), 4) for c in lm.confidence]))
    node.SetAttribute(ATTR_MODEL, str(lm.meta.get("model", "")))
    node.SetAttribute(ATTR_ERROR_MODEL, json.dumps(lm.meta.get("error_model")))
    if "plausibility" in lm.meta:
        node.SetAttribute(ATTR_PLAUSIBILITY, json.dumps(lm.meta["plausibility"]))
    else:
        node.RemoveAttribute(ATTR_PLAUSIBILITY)
    if volume_node is not None:
        node.SetAttribute(ATTR_VOLUME, volume_node.GetID())
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
    """Rows for the landmark table, least confident first: index, name, confidence, corrected."""
    conf = json.loads(node.GetAttribute(ATTR_CONFIDENCE) or "[]")
    flags = corrected_flags(node)
    rows = [{"index": i, "name": node.GetNthControlPointLabel(i),
             "confidence": conf[i] if i < len(conf) else float("nan"), "corrected": flags[i]}
            for i in range(node.GetNumberOfControlPoints())]
    return sorted(rows, key=lambda r: (r["confidence"], r["index"]))


def plausibility_warning(node: Any) -> str:
    """The verdict's warning for the points of this node ("" when plausible or unchecked)."""
    text = node.GetAttribute(ATTR_PLAUSIBILITY) if node is not None else None
    return json.loads(text).get("warning", "") if text else ""


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
