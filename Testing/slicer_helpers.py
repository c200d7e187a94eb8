"""Real Slicer MRML (slicer-core) helpers for the tests."""
from __future__ import annotations

import numpy as np
import slicer
import slicer_core


def new_scene():
    scene = slicer.vtkMRMLScene()
    selection = slicer.vtkMRMLSelectionNode()  # the singleton that Slicer's app adds
    selection.SetSingletonTag("Singleton")
    scene.AddNode(selection)
    logic = slicer_core.vtkSlicerMarkupsModuleLogic.vtkSlicerMarkupsLogic()
    logic.SetMRMLScene(scene)
    return scene, logic


def read_markups_with_slicer(path) -> tuple[list[str], np.ndarray, list[str]]:
    """Load a .mrk.json through vtkMRMLMarkupsJsonStorageNode: labels, RAS (K, 3), descriptions."""
    scene, _logic = new_scene()
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    storage = scene.AddNewNodeByClass("vtkMRMLMarkupsJsonStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"Slicer could not read {path}"
    n = node.GetNumberOfControlPoints()
    ras = np.array([node.GetNthControlPointPosition(i) for i in range(n)])
    labels = [node.GetNthControlPointLabel(i) for i in range(n)]
    descs = [node.GetNthControlPointDescription(i) for i in range(n)]
    return labels, ras, descs
