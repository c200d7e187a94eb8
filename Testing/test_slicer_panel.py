"""The Slicer panel: the module's parameter node under Slicer's own parameterNodeWrapper (5.6.2
and 5.12.3 over slicer-core), and the panel controller's rules: each patient's own points,
settings that survive Close Scene, points marked missing, honest millimetres."""
import csv
import json
import os
import sys
import unittest
from pathlib import Path

import numpy as np
import pytest
import vtk

from MedSapiensLandmarksLib import atomic
from MedSapiensLandmarksLib.datasets import read_landmark_csv
from MedSapiensLandmarksLib.export import read_cases
from MedSapiensLandmarksLib.logic import LandmarksLogic
from MedSapiensLandmarksLib.markups import read_markups
from MedSapiensLandmarksLib.mrml import corrected_flags, volume_spacing
from MedSapiensLandmarksLib.panel import PanelController
from slicer_helpers import new_scene
from slicer_reference import VERSIONS, reference_slicer
from test_slicer_logic import ceph_as_nrrd, load_volume, pixel_to_ras


class Settings:
    """QSettings' interface over a dict (Qt is not here); the panel keeps choices in it."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    def value(self, key, default=None):
        return self.data.get(key, default)

    def setValue(self, key, value):
        self.data[key] = value


def rgb_volume(scene, name="colour"):
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(40, 30, 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    node.SetAndObserveImageData(image)
    return node


@pytest.mark.parametrize("version", VERSIONS)
def test_parameter_node_wraps_under_slicers_own_wrapper_before_and_after_close_scene(version):
    scene = new_scene()[0]
    with reference_slicer(version, scene) as module:
        logic = module.MedSapiensLandmarksLogic()
        for _ in range(2):  # a fresh scene, then the same after File > Close Scene
            p = logic.getParameterNode()
            assert p.inputVolume is None and p.landmarks is None and p.model == "default"
            assert p.anatomy == "checkpoint's own"  # no blank item in the Anatomy combo
            scalar = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "grey")
            p.inputVolume = scalar
            assert p.inputVolume is scalar
            p.inputVolume = rgb_volume(scene)
            assert p.inputVolume.GetClassName() == "vtkMRMLVectorVolumeNode"
            p.inputVolume = None
            assert module.MedSapiensLandmarksParameterNode(p.parameterNode).inputVolume is None
            scene.Clear()


def test_two_patients_keep_their_own_untouched_point_lists(ceph_dir, tmp_path):
    scene = new_scene()[0]
    with reference_slicer(VERSIONS[-1], scene) as module:
        p = module.MedSapiensLandmarksLogic().getParameterNode()
        panel = PanelController(LandmarksLogic(scene))
        a = load_volume(scene, ceph_as_nrrd(ceph_dir, tmp_path, "151"))
        b = load_volume(scene, ceph_as_nrrd(ceph_dir, tmp_path, "152"))
        p.inputVolume = a
        panel.sync(p)
        first = panel.detect(p)
        assert p.landmarks is first
        moved = np.array(first.GetNthControlPointPosition(3)) + [3.0, 0, 0]
        first.SetNthControlPointPosition(3, *moved)
        assert corrected_flags(first)[3]
        before = np.array([first.GetNthControlPointPosition(i) for i in range(19)])
        p.inputVolume = b
        panel.sync(p)
        assert p.landmarks is None  # the second patient does not show the first one's points
        assert not panel.view(p).export and panel.view(p).rows == []
        second = panel.detect(p)
        assert second is not first and p.landmarks is second
        assert not any(corrected_flags(second))
        assert np.array_equal([first.GetNthControlPointPosition(i) for i in range(19)], before)
        assert corrected_flags(first) == [i == 3 for i in range(19)]
        # the user picks patient A's list while B is shown: not shown, not written, not exported
        p.landmarks = first
        assert panel.view(p).notice.startswith(f"'{first.GetName()}' holds the points of '{a.GetName()}'")
        assert panel.detect(p) is second
        assert np.array_equal([first.GetNthControlPointPosition(i) for i in range(19)], before)
        with pytest.raises(ValueError, match="holds the points of"):
            panel.logic.export(b, first, tmp_path / "out")
        p.inputVolume = a
        panel.sync(p)
        assert p.landmarks is first  # found again when its volume is picked again
        p.exportFolder = tmp_path / "out"
        _, status = panel.export(p)
        assert status.endswith("the model is adapted to 1 case of this site")
        assert p.model == str(tmp_path / "out" / "site-model" / "model.json")
        p.inputVolume = b
        panel.sync(p)
        _, status = panel.export(p)
        # one case with a moved point, one without: no correction repeats, so nothing is moved
        assert status.endswith("adapted to 2 cases of this site (no offsets applied yet: the corrections do not "
                               "repeat from case to case)")
        card = json.loads(Path(p.model).read_text())
        assert card["site_layer"]["withheld"] and card["site_layer"]["offsets"][3][0] != 0.0
        assert card["site_layer"]["cases"] == ["151", "152"]
        # the network's own confidence went through the node and the export: the site's
        # calibration is refitted from both cases
        assert card["calibration"]["site_cases"] == ["151", "152"] and card["calibration"]["site_points"] == 38
        assert "the errors of 2 site cases with the layer withheld" in card["site_layer"]["confidence"]
        cases, _ = read_cases(tmp_path / "out")
        exported = {c.case_id: c.xy for c in cases}
        truth = {c.case_id: c.xy for c in read_landmark_csv(ceph_dir / "test1_senior.csv")}
        # each case holds its own patient's detections (within 5 mm of that patient's annotation)
        for case in ("151", "152"):
            assert np.median(np.linalg.norm(exported[case] - truth[case], axis=1)) * 0.1 < 5.0


def test_choices_outlive_close_scene_but_not_a_loaded_scenes_own():
    scene = new_scene()[0]
    settings = Settings()
    with reference_slicer(VERSIONS[0], scene) as module:
        logic = module.MedSapiensLandmarksLogic()
        panel = PanelController(LandmarksLogic(scene), settings)
        p = logic.getParameterNode()
        panel.restore(p)
        p.model, p.device, p.exportFolder = "/clinic/models/finetuned/model.json", "cpu", Path("/clinic/cases")
        panel.sync(p)
        scene.Clear()  # Close Scene: Slicer resets the parameter node
        p = logic.getParameterNode()
        assert p.model == "default"
        panel.restore(p)
        assert (p.model, p.device, str(p.exportFolder)) == ("/clinic/models/finetuned/model.json", "cpu",
                                                            "/clinic/cases")
        scene.Clear()
        p = logic.getParameterNode()
        p.model = "hand-default"  # as a loaded scene holds it
        panel.restore(p)
        assert p.model == "hand-default" and p.device == "cpu"


def test_dependencies_follow_the_model_and_the_device():
    scene = new_scene()[0]
    with reference_slicer(VERSIONS[-1], scene) as module:
        p = module.MedSapiensLandmarksLogic().getParameterNode()
        panel = PanelController(LandmarksLogic(scene))
        assert panel.dependencies(p) == "onnx"
        p.device = "cuda"  # the torch backend: a raw "No module named 'torch'" before
        assert panel.dependencies(p) == "torch"


def mark_points(node, missing=(), unset=()):
    for i in missing:
        node.SetNthControlPointPositionMissing(i)
    for i in unset:
        node.UnsetNthControlPointPosition(i)


def test_points_marked_missing_travel_through_markups_export_training_and_analyses(ceph_dir, tmp_path):
    from MedSapiensLandmarksLib.training import PatchSet, recipe, softmax_ce

    scene = new_scene()[0]
    logic = LandmarksLogic(scene)
    vol = load_volume(scene, ceph_as_nrrd(ceph_dir, tmp_path, "151"))
    node = logic.detect(vol)
    detected = np.array([node.GetNthControlPointPosition(i) for i in range(19)])
    mark_points(node, missing=[4], unset=[5])  # A: Skip placement; B: Unset position
    flags = corrected_flags(node)
    assert flags[4] and flags[5] and sum(flags) == 2  # the clinician's decisions
    logic.detect(vol, markups_node=node)  # Detect does not re-place them
    assert node.GetNthControlPointPositionStatus(4) == node.PositionMissing
    assert node.GetNthControlPointPositionStatus(5) == node.PositionUndefined
    # analyses: a measurement that needs A or B is undefined, the others have values
    rows = {r["key"]: r for r in logic.measurements(vol, node)}
    assert np.isnan(rows["Steiner SNA"]["value"]) and rows["Steiner SNA"]["note"] == "undefined: A marked missing"
    assert rows["Steiner ANB"]["note"] == "undefined: A, B marked missing"
    assert np.isfinite(rows["Steiner SN-GoGn"]["value"])
    case = logic.export(vol, node, tmp_path / "out", report=True)  # the report leaves them out too
    assert (case / "report.pdf").stat().st_size > 10_000
    doc = json.loads((case / "landmarks.mrk.json").read_text())
    status = [p["positionStatus"] for p in doc["markups"][0]["controlPoints"]]
    assert status[4] == "missing" and status[5] == "undefined" and status.count("defined") == 17
    back = read_markups(case / "landmarks.mrk.json")
    assert np.isnan(back["lps"][[4, 5]]).all() and np.isfinite(np.delete(back["lps"], [4, 5], 0)).all()
    assert np.allclose(np.delete(back["lps"], [4, 5], 0) * [-1, -1, 1], np.delete(detected, [4, 5], 0), atol=1e-3)
    # Slicer's own reader gets the same statuses
    reread = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    storage = scene.AddNewNodeByClass("vtkMRMLMarkupsJsonStorageNode")
    storage.SetFileName(str(case / "landmarks.mrk.json"))
    assert storage.ReadData(reread)
    assert [reread.GetNthControlPointPositionStatus(i) for i in (3, 4, 5)] == [
        reread.PositionDefined, reread.PositionMissing, reread.PositionUndefined]
    coco = json.loads((tmp_path / "out" / "coco_keypoints.json").read_text())["annotations"][0]
    assert coco["keypoints"][4 * 3:6 * 3] == [0.0, 0.0, 0, 0.0, 0.0, 0] and coco["num_keypoints"] == 17
    row = list(csv.reader(open(tmp_path / "out" / "landmarks.csv")))[1]
    assert row[1 + 8:1 + 12] == ["", "", "", ""] and all(row[1:9])
    # training: the exported case has NaN for those points, no patch and no loss for them
    cases, _ = read_cases(tmp_path / "out")
    assert np.isnan(cases[0].xy[[4, 5]]).all()
    assert np.isnan(read_landmark_csv(tmp_path / "out" / "landmarks.csv", tmp_path / "out")[0].xy[[4, 5]]).all()
    gray = np.zeros((2400, 1935), np.uint8)
    cfg = recipe("v2")
    spec = {"size": list(cfg.refine_size), "box_fraction": cfg.refine_fraction, "mean": [127.5], "std": [64.0]}
    coarse = {"size": list(cfg.coarse_size), "padding": 1.0}
    patches = PatchSet(cases, [gray], spec, coarse, cfg, augment=False)
    assert len(patches) == 17 and {patches[i][2] for i in range(len(patches))} == set(range(19)) - {4, 5}
    import torch

    logits = torch.randn(1, 3, 8, 8)
    target = torch.rand(1, 3, 8, 8)
    weight = torch.tensor([[1.0, 0.0, 1.0]])
    # a missing point's heatmap (any target, even NaN-derived) adds nothing to the loss
    assert torch.isclose(softmax_ce(logits, target, weight), softmax_ce(logits[:, [0, 2]], target[:, [0, 2]]))


def jpeg_volume(scene, ceph_dir, tmp_path):
    """A cephalogram as Slicer loads its JPEG: 1 mm/pixel, the storage node naming the .jpg
    (slicer-core's ITK has no JPEG reader: the pixels come through an NRRD of that geometry)."""
    node = load_volume(scene, ceph_as_nrrd(ceph_dir, tmp_path, "151", spacing=(1.0, 1.0)))
    node.GetStorageNode().SetFileName(str(ceph_dir / "images" / "151.jpg"))
    return node


def test_a_jpeg_has_no_millimetres_until_calibrated_on_its_ruler(ceph_dir, tmp_path):
    scene = new_scene()[0]
    logic = LandmarksLogic(scene)
    panel = PanelController(logic)
    vol = jpeg_volume(scene, ceph_dir, tmp_path)
    assert vol.GetSpacing()[0] == 1.0 and not volume_spacing(vol)["known"]

    class Params:
        inputVolume, landmarks, sliceIndex, model, device, anatomy = vol, None, 0, "default", "auto", ""
        exportFolder, caseId = tmp_path / "out", ""

    p = Params()
    assert panel.view(p).spacing.startswith("Pixel spacing unknown (none in the JPG file)")
    node = panel.detect(p)
    rows = {r["key"]: r for r in logic.measurements(vol, node)}
    assert rows["Bjork-Jarabak S-N"]["note"] == "needs pixel spacing"  # not ~700 "mm"
    assert rows["Steiner SNA"]["note"] == ""  # angles need no spacing
    _, shown = panel.analyses(p, tracing=True)  # the panel's table and its tracing lines
    lines = [scene.GetNodeByID(i) for i in json.loads(node.GetAttribute("MedSapiens.TracingLines")).values()]
    assert len(shown) == len(rows) and len(lines) >= 8 and all(ln.GetDisplayNode().GetVisibility() for ln in lines)
    panel.analyses(p, tracing=False)
    assert not any(ln.GetDisplayNode().GetVisibility() for ln in lines)
    # the ruler: two points 300 pixels apart on the image, 30 mm on the ruler -> 0.1 mm/pixel
    ruler = scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", "Ruler")
    for xy in ([100.0, 200.0], [100.0, 500.0]):
        ruler.AddControlPoint(vtk.vtkVector3d(*pixel_to_ras(vol, np.array([xy]))[0]))
    pixels_before = logic.current_landmarks(vol, node)[1].xy
    assert panel.calibrate(p, ruler, "30") == pytest.approx(0.1)
    assert vol.GetSpacing()[:2] == pytest.approx((0.1, 0.1))
    assert panel.view(p).spacing == "0.1 mm/pixel (from ruler: 30 mm over two points)"
    # the points stay on their pixels and are not taken for corrections
    assert np.allclose(logic.current_landmarks(vol, node)[1].xy, pixels_before, atol=1e-6)
    assert not any(corrected_flags(node))
    length = {r["key"]: r for r in logic.measurements(vol, node)}["Bjork-Jarabak S-N"]["value"]
    truth = {c.case_id: c.xy for c in read_landmark_csv(ceph_dir / "test1_senior.csv")}["151"]
    assert length == pytest.approx(np.linalg.norm(truth[0] - truth[1]) * 0.1, abs=3.0)  # S-N in mm
    panel.set_spacing(p, "0,12")  # typed, with a decimal comma
    assert vol.GetSpacing()[0] == pytest.approx(0.12) and panel.view(p).spacing.endswith("(from user)")
    with pytest.raises(ValueError, match="not a number"):
        panel.set_spacing(p, "abc")
    for bad in ("-1", "1e308", "nan", "0"):  # 1e308 hung ITK; NaN was written as 1 mm
        with pytest.raises(ValueError, match="outside 0.01-10 mm per pixel"):
            panel.set_spacing(p, bad)
    assert vol.GetSpacing()[0] == pytest.approx(0.12)  # a refused value changes nothing


@pytest.mark.skipif(sys.platform == "win32", reason="emulates Windows' rule with POSIX fcntl")
def test_fsync_uses_a_handle_windows_accepts(tmp_path, monkeypatch):
    """Windows' FlushFileBuffers refuses a read-only handle: check the mode the way it does."""
    import fcntl

    real = os.fsync
    synced = []

    def windows_fsync(fd):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(9, "Bad file descriptor (read-only handle)")
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", windows_fsync)
    with atomic.atomic_write(tmp_path / "a.txt") as tmp:
        tmp.write_text("x")
    assert (tmp_path / "a.txt").read_text() == "x" and synced
    from MedSapiensLandmarksLib.export import export_case
    from MedSapiensLandmarksLib.imageio import Radiograph
    from MedSapiensLandmarksLib.landmarks import Landmarks

    image = Radiograph(np.full((40, 30), 100, np.uint8), np.array([[0.1, 0, 0], [0, 0.1, 0], [0, 0, 0.0]]), True)
    xy = np.array([[10.0, 12.0], [20.0, 30.0]])
    lm = Landmarks(["P1", "P2"], ["p", "p"], xy, image.to_lps(xy), np.ones(2))
    case = export_case(tmp_path / "cases", "c1", image, lm, [False, True])
    assert (case / "image.nrrd").exists() and len(synced) >= 4


@pytest.mark.parametrize("version", VERSIONS)
def test_self_test_builds_the_panel_and_skips_visibly_without_onnxruntime(version, monkeypatch):
    from MedSapiensLandmarksLib import install

    scene = new_scene()[0]
    with reference_slicer(version, scene) as module:
        selected = []

        class Built(Exception):
            pass

        def select(name):
            selected.append(name)
            raise Built

        monkeypatch.setattr(module.slicer.util, "selectModule", select)
        test = module.MedSapiensLandmarksTest()
        with pytest.raises(Built):
            test.test_panel_opens()  # goes through Slicer's module path to build the widget
        assert selected == ["MedSapiensLandmarks"]

        class Widget:  # what selectModule hands over once the panel is built
            logic = module.MedSapiensLandmarksLogic()

        monkeypatch.setattr(test, "_widget", lambda: Widget)
        monkeypatch.setattr(install, "missing_packages", lambda kind: ["onnxruntime"])

        class App:
            @staticmethod
            def testingEnabled():
                return True

        monkeypatch.setattr(module.slicer, "app", App, raising=False)
        with pytest.raises(unittest.SkipTest, match="onnxruntime is not installed"):
            test.test_two_patients()


@pytest.mark.parametrize("tags, spacing, source", [
    ({"0028,0030": "0.25\\0.2"}, (0.2, 0.25), "DICOM Pixel Spacing (0028,0030)"),
    ({"0018,1164": "0.15\\0.15", "0018,1114": "1.1"}, (0.15 / 1.1, 0.15 / 1.1),
     "DICOM Imager Pixel Spacing (0018,1164) / Estimated Radiographic Magnification Factor 1.1 (0018,1114)"),
    ({}, None, "none in the DICOM file (no Pixel Spacing, no Imager Pixel Spacing)"),
])
def test_a_dicom_radiograph_gets_the_spacing_its_tags_mean(tags, spacing, source):
    """Slicer's DICOM reader puts the detector-plane Imager Pixel Spacing on a radiograph without
    Pixel Spacing; the panel reads the tags (``dicomDatabase.instanceValue``) and applies the
    magnification factor, saying which tag it used."""
    scene = new_scene()[0]
    volume = rgb_volume(scene, "dx")
    volume.SetSpacing(0.15, 0.15, 1.0)  # as Slicer loaded it
    volume.SetAttribute("DICOM.instanceUIDs", "1.2.3.4")
    database = {("1.2.3.4", tag): value for tag, value in tags.items()}
    panel = PanelController(LandmarksLogic(scene), dicom_value=lambda uid, tag: database.get((uid, tag), ""))

    class Params:
        inputVolume, landmarks = volume, None

    panel.sync(Params())
    got = volume_spacing(volume)
    assert got["source"] == source and got["known"] == (spacing is not None)
    if spacing is not None:
        assert got["mm"] == pytest.approx(spacing)
    panel.set_spacing(Params(), "0.1")  # the user's value wins and stays
    panel._volume = None
    panel.sync(Params())
    assert volume.GetSpacing()[:2] == pytest.approx((0.1, 0.1))


def test_each_export_refits_the_site_layer_from_the_markups_alone(ceph_dir, tmp_path, monkeypatch):
    """A clinic that puts Pog' 3 mm further forward: after three exported corrections, the next
    patient's Pog' is detected there; refitting reads no image and detects nothing again."""
    from MedSapiensLandmarksLib.adaptation import basis

    scene = new_scene()[0]
    logic = LandmarksLogic(scene)
    panel = PanelController(logic)

    class Params:
        landmarks, sliceIndex, model, device, anatomy, caseId = None, 0, "ceph-isbi2015", "auto", "", ""
        exportFolder = tmp_path / "site"

    p = Params()
    for case in ("141", "142", "143"):
        p.inputVolume, p.landmarks = load_volume(scene, ceph_as_nrrd(ceph_dir, tmp_path, case)), None
        p.model = "ceph-isbi2015"  # the clinician's Pog' is 3 mm from the base model's, every time
        node = panel.detect(p)
        x, y, z = node.GetNthControlPointPosition(15)
        node.SetNthControlPointPosition(15, x - 3.0, y, z)  # RAS: 3 mm towards patient left = +x pixels
        if case == "143":
            import MedSapiensLandmarksLib.detector as detector_module

            monkeypatch.setattr(detector_module.Detector, "detect", None)  # refitting detects nothing
        _, status = panel.export(p)
        monkeypatch.undo()
    assert status.endswith("adapted to 3 cases of this site")
    layer = json.loads(Path(p.model).read_text())["site_layer"]
    assert layer["frame"] == "sn" and layer["counts"][15] == 3
    assert max(abs(v) for k, o in enumerate(layer["offsets"]) if k != 15 for v in o) < 1e-4  # stored to 1e-3 px
    p.inputVolume, p.landmarks = load_volume(scene, ceph_as_nrrd(ceph_dir, tmp_path, "144")), None
    node = panel.detect(p)  # with the adapted model
    base = logic.detector("ceph-isbi2015").detect(logic.current_landmarks(p.inputVolume, node)[0])
    moved = (logic.current_landmarks(p.inputVolume, node)[1].xy - base.xy) * 0.1
    assert np.linalg.norm(np.delete(moved, 15, 0), axis=1).max() < 1e-3
    assert moved[15][0] == pytest.approx(3.0 * 3 / 3.5, abs=0.4)  # mm along x, shrunk by half a case
    expected = np.array(layer["offsets"][15]) @ basis(base.xy, (0.1, 0.1), base.names, "sn").T * 0.1
    assert np.allclose(moved[15], expected, atol=1e-3)


def test_the_export_status_says_when_the_sites_errors_lowered_the_confidence(tmp_path):
    from MedSapiensLandmarksLib.panel import adapted_text
    from MedSapiensLandmarksLib.site_model import SiteFit

    for scale, cases, said in ((1.4142, 3, "the model is adapted to 3 cases of this site; confidence lowered to "
                                           "this site's errors (x1.41 wider)"),
                               (1.0, 1, "the model is adapted to 1 case of this site")):
        assert adapted_text(SiteFit(tmp_path / "model.json", cases, scale)) == said
    assert adapted_text(SiteFit(tmp_path / "model.json", 3, 1.0, withheld=True)) == (
        "the model is adapted to 3 cases of this site (no offsets applied yet: the corrections do not repeat from "
        "case to case)")


def test_the_finetune_outcome_says_when_the_check_could_not_tell_the_models_apart():
    from MedSapiensLandmarksLib.panel import finetune_outcome

    result = {"status": "accepted", "mre_before_mm": 1.50, "mre_after_mm": 1.53, "noise_mm": 0.08}
    assert finetune_outcome(result) == ("question", "Fine-tuned model: MRE 1.53 mm on held-back cases (was 1.50 mm; "
                                                    "the difference is within the check's noise of 0.08 mm). Use it?")
    result = {**result, "status": "rejected", "mre_after_mm": 1.70}
    assert finetune_outcome(result) == ("info", "The fine-tuned model was worse on held-back cases (MRE 1.70 vs "
                                                "1.50 mm, more than the check's noise of 0.08 mm); the current model "
                                                "is kept.")


def test_detect_says_which_landmark_the_shape_check_looked_at_again(hand_dir, tmp_path):
    import SimpleITK as sitk
    from PIL import Image
    from MedSapiensLandmarksLib.panel import detected_text
    from test_plausibility import exposure_changed_hand
    from test_slicer_logic import pixel_to_ras

    case = exposure_changed_hand(hand_dir, tmp_path / "3301.png")
    itk = sitk.GetImageFromArray(np.asarray(Image.open(tmp_path / "3301.png"))[None])
    itk.SetSpacing((0.1, 0.1, 1.0))
    sitk.WriteImage(itk, str(tmp_path / "3301.nrrd"))
    scene = new_scene()[0]
    with reference_slicer(VERSIONS[-1], scene) as module:
        p = module.MedSapiensLandmarksLogic().getParameterNode()
        panel = PanelController(LandmarksLogic(scene))
        p.inputVolume = load_volume(scene, tmp_path / "3301.nrrd")
        p.model = "hand-dha"
        panel.sync(p)
        node = panel.detect(p)
        names = json.loads(node.GetAttribute("MedSapiens.Plausibility"))["rechecked"]
        assert len(names) == 1
        assert detected_text(node) == (f"37 landmarks; drag to correct. {names[0]}: looked at again where the "
                                       "other landmarks put it (far from there at first); check it.")
        k = [node.GetNthControlPointLabel(i) for i in range(37)].index(names[0])
        truth = pixel_to_ras(p.inputVolume, case.xy[k:k + 1])[0]
        assert np.linalg.norm(np.array(node.GetNthControlPointPosition(k)) - truth) < 3.0  # mm
