"""MedSapiensLandmarks: detect anatomical landmarks on a radiograph, correct them, export, fine-tune.

The module file stays thin: all computation is in ``MedSapiensLandmarksLib`` (tested outside
Slicer against slicer-core); this file binds it to the Qt panel.
"""
from __future__ import annotations

import logging
import os
import shutil
import unittest
from pathlib import Path
from typing import Annotated, Optional, Union

import qt
import slicer
import vtk
from MedSapiensLandmarksLib.errors import CheckpointError
from MedSapiensLandmarksLib.panel import (ANATOMY_OWN, DEFAULTS, PanelController, detected_text, finetune_outcome,
                                         model_choices)
from slicer import (vtkMRMLMarkupsFiducialNode, vtkMRMLMarkupsLineNode, vtkMRMLScalarVolumeNode,
                    vtkMRMLVectorVolumeNode)
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
    # shows exactly these two classes: no label maps). Optional: Slicer writes None into a new node.
    inputVolume: Optional[Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode]]
    sliceIndex: Annotated[int, WithinRange(0, 100000)] = 0
    model: str = DEFAULTS["model"]
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = DEFAULTS["device"]
    # only for official multi-dataset checkpoints (88 channels)
    anatomy: Annotated[str, Choice([ANATOMY_OWN, "head", "chest", "hand", "leg"])] = ANATOMY_OWN
    landmarks: Optional[vtkMRMLMarkupsFiducialNode]
    ruler: Optional[vtkMRMLMarkupsLineNode]
    rulerDistance: Annotated[float, WithinRange(0.1, 1000.0)] = 10.0
    exportFolder: Path = DEFAULTS["exportFolder"]
    caseId: str = ""


class MedSapiensLandmarksWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Qt binding of `PanelController`: signals in, `PanelView` out; no decision of its own."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.panel = None
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
        self.panel = PanelController(self.logic.core, qt.QSettings(), self._dicomValue)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.detectButton.connect("clicked(bool)", self.onDetect)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetune)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.modelFileButton.connect("clicked(bool)", self.onChooseModelFile)
        self.ui.modelListComboBox.addItem("Models...", "")
        for name, label in model_choices():
            self.ui.modelListComboBox.addItem(label, name)
        self.ui.modelListComboBox.connect("activated(int)", self.onModelListed)
        self.ui.spacingButton.connect("clicked(bool)", self.onSetSpacing)
        self.ui.calibrateButton.connect("clicked(bool)", self.onCalibrate)
        self.ui.rulerSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.ui.rulerPlaceWidget.setCurrentNode)
        self.ui.landmarkTable.connect("cellClicked(int,int)", self.onTableClicked)
        self.ui.tracingCheckBox.connect("toggled(bool)", lambda checked: self._fillTable())
        self.ui.warningLabel.hide()
        self.initializeParameterNode()

    @staticmethod
    def _dicomValue(uid: str, tag: str) -> str:
        """A DICOM tag of an instance ("0028,0030"), looked up when asked: the database exists
        from the application's start, its ``slicer.dicomDatabase`` alias only after start-up."""
        database = slicer.app.dicomDatabase()
        return database.instanceValue(uid, tag) if database is not None else ""

    def cleanup(self) -> None:
        self.removeObservers()
        self._timer.stop()
        self._tableTimer.stop()
        if self._job is not None:
            self._job.cancel(wait=False)
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

        node = self.logic.getParameterNode()
        self.panel.restore(node)  # the user's model, device and export folder survive Close Scene
        if not node.inputVolume:
            node.inputVolume = first_radiograph_volume(slicer.mrmlScene)
        self.setParameterNode(node)

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
        if p is not None:
            self.panel.sync(p)  # a new volume brings its own landmark list
        view = self.panel.view(p, self._job is not None)
        self.ui.sliceIndexSpinBox.enabled = view.slice_enabled
        self.ui.sliceIndexSpinBox.maximum = view.slice_max
        self.ui.detectButton.enabled = view.detect
        self.ui.exportButton.enabled = view.export
        self.ui.finetuneButton.enabled = view.finetune
        self.ui.cancelButton.enabled = view.cancel
        self.ui.calibrateButton.enabled = self.ui.spacingButton.enabled = view.calibrate
        self.ui.spacingLabel.text = view.spacing
        self.ui.noticeLabel.text = view.notice
        self.ui.noticeLabel.visible = bool(view.notice)
        self._watch(self.panel.shown_landmarks(p))
        self._fillTable(view)

    def _watch(self, node) -> None:
        """Follow the shown markups node, however it got there (Detect, the selector, a scene
        load): corrections are recorded by the logic, point moves refresh the table."""
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

    def _fillTable(self, view=None) -> None:
        view = view or self.panel.view(self._parameterNode, self._job is not None)
        table = self.ui.landmarkTable
        table.setRowCount(len(view.rows))
        for r, row in enumerate(view.rows):
            for c, text in enumerate([row["name"], f"{row['confidence']:.2f}", row["state"]]):
                item = qt.QTableWidgetItem(text)
                item.setData(qt.Qt.UserRole, row["index"])
                if row["doubtful"]:
                    item.setForeground(qt.QBrush(qt.QColor("red")))
                table.setItem(r, c, item)
        self._showAnalysis()

    def _showAnalysis(self) -> None:
        """The plausibility warning and the measurements table (the controller moves the lines)."""
        from MedSapiensLandmarksLib.cephalometry import cells

        warning, rows = self.panel.analyses(self._parameterNode, self.ui.tracingCheckBox.checked)
        self.ui.warningLabel.text = f"Warning: {warning}" if warning else ""
        self.ui.warningLabel.visible = bool(warning)
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

    def onDetect(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Landmark detection failed.", waitCursor=True):
            if self.panel.download_needed(p) is not None:
                self._download(p)
            if not self.logic.ensureDependencies(self.panel.dependencies(p)):
                return
            self.ui.statusLabel.text = "Detecting..."
            slicer.app.processEvents()
            node = self.panel.detect(p)
            self.ui.statusLabel.text = detected_text(node)
            self._updateGui()

    def onSetSpacing(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not set the pixel spacing."):
            self.panel.set_spacing(self._parameterNode, self.ui.spacingEdit.text)
            self._updateGui()

    def onCalibrate(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Ruler calibration failed."):
            self.panel.calibrate(p, p.ruler, str(p.rulerDistance))
            self._updateGui()

    def _download(self, p) -> None:
        """The chosen model from the model index, once, under Slicer's progress dialog."""
        entry = self.panel.download_needed(p)
        dialog = slicer.util.createProgressDialog(
            windowTitle="MedSapiens Landmarks", maximum=100,
            labelText=f"Downloading {p.model} ({entry['size'] / 1e6:.0f} MB), once; later runs use the copy.")

        def progress(done: int, total: int) -> None:
            dialog.value = int(100 * done / total) if total else 0
            slicer.app.processEvents()
            if dialog.wasCanceled:
                raise CheckpointError(f"download of {p.model} cancelled; nothing was kept")

        try:
            self.panel.download(p, progress)
        finally:
            dialog.setParent(None)  # as Slicer's DICOM browser does: no hidden dialog left behind
            dialog.close()

    def onModelListed(self, index: int) -> None:
        name = self.ui.modelListComboBox.itemData(index)
        if name:
            self._parameterNode.model = name
        self.ui.modelListComboBox.setCurrentIndex(0)

    def onChooseModelFile(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, "Model card or MedSapiens checkpoint", "",
                                              "Models (*.json *.pth)")
        if path:
            self._parameterNode.model = path

    def onTableClicked(self, row: int, column: int) -> None:
        node = self.panel.shown_landmarks(self._parameterNode)
        index = self.ui.landmarkTable.item(row, 0).data(qt.Qt.UserRole)
        if node is not None and index is not None:
            slicer.modules.markups.logic().JumpSlicesToNthPointInMarkup(node.GetID(), int(index), True)

    def onExport(self) -> None:
        with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
            report = self.ui.reportCheckBox.checked
            if report and not self.logic.ensureDependencies("report"):
                return
            _case, status = self.panel.export(self._parameterNode, report=report)
            self.ui.statusLabel.text = status

    def onFinetune(self) -> None:
        from MedSapiensLandmarksLib.logic import FinetuneJob

        p = self._parameterNode
        out = self.panel.finetune_folder(p, qt.QDateTime.currentDateTime().toString("yyyyMMdd-hhmmss"))
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
        self.ui.statusLabel.text = f"Fine-tuning {result['status']}."
        kind, text = finetune_outcome(result)
        if kind == "error":
            slicer.util.errorDisplay(text)
        elif kind == "info":
            slicer.util.infoDisplay(text)
        elif kind == "question" and self._parameterNode and slicer.util.confirmYesNoDisplay(text):
            self._parameterNode.model = result["model"]
        if self._parameterNode:  # None after File > Close Scene during the run
            self._updateGui()

    def onCancel(self) -> None:
        if self._job is not None:
            self.ui.statusLabel.text = "Cancelling fine-tuning..."
            self._job.cancel(wait=False)  # the poll timer sees the end; the GUI never blocks


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
    """Runs in real Slicer (Reload and Test, or ``slicer.selfTests["MedSapiensLandmarks"]()``):
    the panel is built through Slicer's own module path and survives Close Scene; then, on two
    synthetic radiographs, Detect -> drag -> the second patient -> Detect -> Export both.

    Without onnxruntime the detection part raises unittest's SkipTest (a visible skip, never a
    silent pass); nothing is installed in testing mode."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Through unittest's runner (as ctest runs it), so a skip is reported as a skip in
        Reload and Test too; a failure or error raises."""
        tests = unittest.defaultTestLoader.loadTestsFromTestCase(type(self))
        result = unittest.TextTestRunner(verbosity=2).run(tests)
        for test, reason in result.skipped:
            slicer.util.delayDisplay(f"Skipped {test.id()}: {reason}")
        if not result.wasSuccessful():
            raise AssertionError("; ".join(str(err) for _test, err in result.failures + result.errors))

    def _widget(self):
        slicer.util.selectModule("MedSapiensLandmarks")  # Slicer builds the panel: setup() runs
        return slicer.modules.medsapienslandmarks.widgetRepresentation().self()

    def test_panel_opens(self):
        widget = self._widget()
        self.assertIsNotNone(widget._parameterNode, "the panel has no parameter node")
        self.assertIsNotNone(widget._parameterNodeGuiTag, "the selectors are not bound")
        slicer.mrmlScene.Clear()  # File > Close Scene
        self.assertIsNotNone(widget._parameterNode, "no parameter node after Close Scene")
        self.assertIsNone(widget._parameterNode.landmarks)
        logging.info("MedSapiensLandmarks panel opens, also after Close Scene")

    def test_two_patients(self):
        import tempfile

        import numpy as np

        widget = self._widget()
        if not widget.logic.ensureDependencies("onnx"):
            self.skipTest("onnxruntime is not installed: the detection part of the self-test is skipped")
        from MedSapiensLandmarksLib.mrml import corrected_flags

        rng = np.random.default_rng(0)
        volumes = [slicer.util.addVolumeFromArray((rng.random((1, 480, 400)) * 50 + 100).astype(np.uint8),
                                                  ijkToRAS=np.diag([-0.2, -0.2, 1.0, 1.0]), name=name)
                   for name in ("patientA", "patientB")]
        p = widget._parameterNode
        p.inputVolume = volumes[0]
        widget.onDetect()
        first = p.landmarks
        self.assertEqual(first.GetNumberOfControlPoints(), 19)
        moved = np.array(first.GetNthControlPointPosition(2)) + [2.0, 0.0, 0.0]
        first.SetNthControlPointPosition(2, *moved)
        self.assertTrue(corrected_flags(first)[2])
        before = [first.GetNthControlPointPosition(i) for i in range(19)]
        p.inputVolume = volumes[1]
        self.assertIsNone(p.landmarks, "the second patient shows the first patient's points")
        widget.onDetect()
        second = p.landmarks
        self.assertIsNot(second, first)
        self.assertEqual([first.GetNthControlPointPosition(i) for i in range(19)], before)
        self.assertFalse(any(corrected_flags(second)))
        p.inputVolume = volumes[0]
        self.assertIs(p.landmarks, first, "the first patient's points are not found again")
        folder, model = p.exportFolder, p.model
        try:
            with tempfile.TemporaryDirectory() as out:
                p.exportFolder = Path(out)
                for volume in volumes:
                    p.inputVolume = volume
                    case, status = widget.panel.export(p)
                    self.assertTrue((case / "landmarks.mrk.json").exists())
                    self.assertIn("adapted to", status)
        finally:
            p.exportFolder, p.model = folder, model  # the user's remembered choices stay theirs
        logging.info("MedSapiensLandmarks test passed")
