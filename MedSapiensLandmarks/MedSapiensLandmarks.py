"""MedSapiensLandmarks: detect anatomical landmarks on a radiograph, correct them, export, fine-tune.

The module file stays thin: all computation is in ``MedSapiensLandmarksLib`` (tested outside
Slicer against slicer-core); this file binds it to the Qt panel.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Annotated, Union

import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin


class MedSapiensLandmarks(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedSapiens Landmarks"
        self.parent.categories = ["Quantification"]
        self.parent.dependencies = ["Markups"]
        self.parent.contributors = ["MedSapiensLandmarks developers"]
        self.parent.helpText = (
            "Detect anatomical landmarks (cephalometric, hand...) on a radiograph with a MedSapiens "
            "foundation model. Drag wrong points to correct them, export corrected cases as training "
            "data and fine-tune the model from them. Red points: low confidence.")
        self.parent.acknowledgementText = (
            "Built on Meta's Sapiens, MedSapiens (xmed-lab), mmpose's UDP codec and timm. "
            "Default model trained on the ISBI 2015 cephalometric challenge data.")


@parameterNodeWrapper
class MedSapiensLandmarksParameterNode:
    # Grey radiographs load as scalar volumes, colour PNG/JPEG/BMP as vector volumes (the .ui
    # shows exactly these two classes: no label maps).
    inputVolume: Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode]
    sliceIndex: Annotated[int, WithinRange(0, 100000)] = 0
    model: str = "default"
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    # only for official multi-dataset checkpoints (88 channels); "" = the checkpoint's own set
    anatomy: Annotated[str, Choice(["", "head", "chest", "hand", "leg"])] = ""
    landmarks: vtkMRMLMarkupsFiducialNode
    exportFolder: Path = Path.home() / "MedSapiensLandmarks" / "cases"
    caseId: str = ""


class MedSapiensLandmarksWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._watched = None  # markups node whose point moves refresh the table
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.timeout.connect(self._pollFinetune)
        self._tableTimer = qt.QTimer()  # table refresh while a point is dragged: at most 5/s
        self._tableTimer.setSingleShot(True)
        self._tableTimer.setInterval(200)
        self._tableTimer.timeout.connect(self._fillTable)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedSapiensLandmarks.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedSapiensLandmarksLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.detectButton.connect("clicked(bool)", self.onDetect)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetune)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.modelFileButton.connect("clicked(bool)", self.onChooseModelFile)
        self.ui.landmarkTable.connect("cellClicked(int,int)", self.onTableClicked)
        self.ui.tracingCheckBox.connect("toggled(bool)", lambda checked: self._fillTable())
        self.ui.warningLabel.hide()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        self._timer.stop()
        self._tableTimer.stop()
        if self._job is not None:
            self._job.cancel()
            self._job = None
        if self.logic:
            self.logic.cleanup()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self._watch(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        from MedSapiensLandmarksLib.mrml import first_radiograph_volume

        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = first_radiograph_volume(slicer.mrmlScene)
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, node) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = node
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
            self._updateGui()

    def _updateGui(self, caller=None, event=None) -> None:
        p = self._parameterNode
        volume = p.inputVolume if p else None
        depth = volume.GetImageData().GetDimensions()[2] if volume and volume.GetImageData() else 1
        self.ui.sliceIndexSpinBox.enabled = depth > 1
        self.ui.sliceIndexSpinBox.maximum = max(0, depth - 1)
        self.ui.detectButton.enabled = bool(volume) and self._job is None
        has_points = bool(p and p.landmarks and volume)
        self.ui.exportButton.enabled = has_points
        self.ui.finetuneButton.enabled = bool(p) and self._job is None
        self.ui.cancelButton.enabled = self._job is not None
        self._watch(p.landmarks if p else None)
        self._fillTable()

    def _watch(self, node) -> None:
        """Follow the selected markups node, however it got there (Detect, the selector, a
        scene load): corrections are recorded by the logic, point moves refresh the table."""
        if node is self._watched:
            return
        if self._watched is not None:
            self.removeObserver(self._watched, self._watched.PointModifiedEvent, self._onPointModified)
            if slicer.mrmlScene.IsNodePresent(self._watched):
                self.logic.core.tracing(self._watched, False)  # another node: its lines go away
        self._watched = node
        if node is not None:
            self.logic.core.observe(node)
            self.addObserver(node, node.PointModifiedEvent, self._onPointModified)

    def _onPointModified(self, caller, event) -> None:
        if not self._tableTimer.isActive():
            self._tableTimer.start()

    def _fillTable(self) -> None:
        from MedSapiensLandmarksLib.markups import LOW_CONFIDENCE
        from MedSapiensLandmarksLib.mrml import table_rows

        table = self.ui.landmarkTable
        node = self._parameterNode.landmarks if self._parameterNode else None
        rows = table_rows(node) if node else []
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            cells = [row["name"], f"{row['confidence']:.2f}", "verified" if row["corrected"] else ""]
            for c, text in enumerate(cells):
                item = qt.QTableWidgetItem(text)
                item.setData(qt.Qt.UserRole, row["index"])
                if row["confidence"] < LOW_CONFIDENCE and not row["corrected"]:
                    item.setForeground(qt.QBrush(qt.QColor("red")))
                table.setItem(r, c, item)
        self._showAnalysis(node)

    def _showAnalysis(self, node) -> None:
        """The plausibility warning, the measurements of the current points, the tracing lines."""
        from MedSapiensLandmarksLib.cephalometry import cells
        from MedSapiensLandmarksLib.mrml import plausibility_warning

        warning = plausibility_warning(node)
        self.ui.warningLabel.text = f"Warning: {warning}" if warning else ""
        self.ui.warningLabel.visible = bool(warning)
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        rows = self.logic.core.measurements(volume, node, self._sliceIndex()) if node and volume else []
        table = self.ui.measurementTable
        table.visible = self.ui.tracingCheckBox.visible = bool(rows)
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, text in enumerate(cells(row)):
                item = qt.QTableWidgetItem(text)
                item.setToolTip(f"{row['definition']} ({row['source']})")
                if row["uncertain"]:
                    item.setForeground(qt.QBrush(qt.QColor("darkorange")))
                table.setItem(r, c, item)
        if node is not None:  # lines follow the points; without analyses they are hidden
            self.logic.core.tracing(node, bool(rows) and self.ui.tracingCheckBox.checked)

    def _sliceIndex(self):
        p = self._parameterNode
        image = p.inputVolume.GetImageData()
        return p.sliceIndex if image and image.GetDimensions()[2] > 1 else None

    def _device(self):
        return None if self._parameterNode.device == "auto" else self._parameterNode.device

    def onDetect(self) -> None:
        from MedSapiensLandmarksLib.cards import backend_kind

        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Landmark detection failed.", waitCursor=True):
            if not self.logic.ensureDependencies(backend_kind(p.model)):
                return
            self.ui.statusLabel.text = "Detecting..."
            slicer.app.processEvents()
            node = self.logic.core.detect(p.inputVolume, model=p.model, markups_node=p.landmarks,
                                          slice_index=self._sliceIndex(),
                                          device=self._device(), anatomy=p.anatomy or None)
            if p.landmarks is not node:
                p.landmarks = node
            self.ui.statusLabel.text = f"{node.GetNumberOfControlPoints()} landmarks; drag to correct."
            self._updateGui()

    def onChooseModelFile(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, "Model card or MedSapiens checkpoint", "",
                                              "Models (*.json *.pth)")
        if path:
            self._parameterNode.model = path

    def onTableClicked(self, row: int, column: int) -> None:
        node = self._parameterNode.landmarks
        index = self.ui.landmarkTable.item(row, 0).data(qt.Qt.UserRole)
        if node is not None and index is not None:
            slicer.modules.markups.logic().JumpSlicesToNthPointInMarkup(node.GetID(), int(index), True)

    def onExport(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
            report = self.ui.reportCheckBox.checked
            if report and not self.logic.ensureDependencies("report"):
                return
            case = self.logic.core.export(p.inputVolume, p.landmarks, p.exportFolder,
                                          case_id=p.caseId or None, slice_index=self._sliceIndex(),
                                          report=report)
            self.ui.statusLabel.text = f"Exported {case}"

    def onFinetune(self) -> None:
        from MedSapiensLandmarksLib.logic import FinetuneJob

        p = self._parameterNode
        out = Path(p.exportFolder).parent / "models" / qt.QDateTime.currentDateTime().toString("yyyyMMdd-hhmmss")
        python = shutil.which("PythonSlicer") or os.path.join(slicer.app.slicerHome, "bin", "PythonSlicer")
        with slicer.util.tryWithErrorDisplay("Could not start fine-tuning.", waitCursor=True):
            if not self.logic.ensureDependencies("torch"):
                return
            self._job = FinetuneJob(p.exportFolder, out, init=p.model, python=python)
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Fine-tuning..."
            self._timer.start()
            self._updateGui()

    def _pollFinetune(self) -> None:
        job = self._job
        if job is None:
            return
        if job.running:
            self.ui.progressBar.value = int(100 * job.progress)
            return
        self._timer.stop()
        result = job.result()
        self._job = None
        self.ui.progressBar.value = 100
        status = result["status"]
        self.ui.statusLabel.text = f"Fine-tuning {status}."
        if status == "failed":
            slicer.util.errorDisplay("Fine-tuning failed:\n" + "\n".join(result["log_tail"]))
        elif status == "accepted":
            self._offerModel(result["model"], f"Fine-tuned model: MRE {result['mre_after_mm']:.2f} mm on "
                             f"held-back cases (was {result['mre_before_mm']:.2f} mm). Use it?")
        elif status == "rejected":
            slicer.util.infoDisplay(
                f"The fine-tuned model was not better on held-back cases (MRE {result['mre_after_mm']:.2f} "
                f"vs {result['mre_before_mm']:.2f} mm); the current model is kept.")
        elif status == "unvalidated":
            self._offerModel(result["model"], "Fine-tuned on too few cases to hold any back for a "
                             "check (export at least 2). Use the new model anyway?")
        if self._parameterNode:  # None after File > Close Scene during the run
            self._updateGui()

    def _offerModel(self, model: str, question: str) -> None:
        if self._parameterNode and slicer.util.confirmYesNoDisplay(question):
            self._parameterNode.model = model

    def onCancel(self) -> None:
        if self._job is not None:
            self.ui.statusLabel.text = "Cancelling fine-tuning..."
            slicer.app.processEvents()
            self._job.cancel()


class MedSapiensLandmarksLogic(ScriptedLoadableModuleLogic):
    """Slicer-facing logic; the work is done by `LandmarksLogic` (no Qt)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._core = None

    def getParameterNode(self):
        return MedSapiensLandmarksParameterNode(super().getParameterNode())

    @staticmethod
    def ensureDependencies(kind: str = "onnx") -> bool:
        """Packages for ``kind`` of work ("onnx": Detect with a shipped model; "torch":
        Fine-tune, official checkpoints; "report": the PDF report). Never installs in testing mode."""
        from MedSapiensLandmarksLib.install import ensure_dependencies

        testing = slicer.app.testingEnabled()
        return ensure_dependencies(kind, ask=not testing, testing=testing)

    @property
    def core(self):
        if self._core is None:
            from MedSapiensLandmarksLib.logic import LandmarksLogic

            self._core = LandmarksLogic(slicer.mrmlScene)
        return self._core

    def cleanup(self) -> None:
        if self._core is not None:
            self._core.cleanup()
            self._core = None


class MedSapiensLandmarksTest(ScriptedLoadableModuleTest):
    """Runs in real Slicer: detect -> correct -> re-detect -> export on a synthetic radiograph.

    Skipped (never installs anything in testing mode) when onnxruntime is not installed."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_detect_correct_export()

    def test_detect_correct_export(self):
        import tempfile

        import numpy as np

        logic = MedSapiensLandmarksLogic()
        if not logic.ensureDependencies("onnx"):
            logging.info("MedSapiensLandmarks test skipped: onnxruntime is not installed")
            return
        from MedSapiensLandmarksLib.mrml import corrected_flags, plausibility_warning

        rng = np.random.default_rng(0)
        arr = (rng.random((1, 480, 400)) * 50 + 100).astype(np.uint8)
        volume = slicer.util.addVolumeFromArray(arr, ijkToRAS=np.diag([-0.2, -0.2, 1.0, 1.0]),
                                                name="synthetic")
        node = logic.core.detect(volume)
        self.assertEqual(node.GetNumberOfControlPoints(), 19)
        moved = np.array(node.GetNthControlPointPosition(2)) + [2.0, 0.0, 0.0]
        node.SetNthControlPointPosition(2, *moved)
        self.assertTrue(corrected_flags(node)[2])
        logic.core.detect(volume, markups_node=node)
        self.assertTrue(np.allclose(node.GetNthControlPointPosition(2), moved))
        # a noise picture: the points are there, and the warning says it is no cephalogram
        self.assertIn("does not look like", plausibility_warning(node))
        rows = logic.core.measurements(volume, node)
        self.assertTrue(len(rows) > 20 and all(r["low"] is not None for r in rows))
        lines = logic.core.tracing(node, True)
        self.assertTrue(lines and all(line.GetLocked() for line in lines))
        with tempfile.TemporaryDirectory() as out:
            case = logic.core.export(volume, node, out)
            self.assertTrue((case / "landmarks.mrk.json").exists())
        logic.cleanup()
        logging.info("MedSapiensLandmarks test passed")
