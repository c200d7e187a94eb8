"""The module logic against real Slicer MRML (slicer-core): detect, correct, re-detect, export."""
import json
import os
import sys
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import SimpleITK as sitk
import vtk

from conftest import SCHEMA
from MedSapiensLandmarksLib.datasets import read_landmark_csv
from MedSapiensLandmarksLib.export import ExportError, read_cases
from MedSapiensLandmarksLib.imageio import read_image
from MedSapiensLandmarksLib.detector import Detector
from MedSapiensLandmarksLib.logic import LandmarksLogic
from MedSapiensLandmarksLib.markups import read_markups
from MedSapiensLandmarksLib.mrml import corrected_flags, ijk_to_ras, table_rows
from MedSapiensLandmarksLib.panel import finetune_outcome
from slicer_helpers import new_scene, read_markups_with_slicer

FLIP = np.array([[-1.0, 0, 0], [0, -1.0, 0], [0, 0, 1.0]])


def load_volume(scene, path):
    """Load through vtkMRMLVolumeArchetypeStorageNode, as Slicer does."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", path.stem)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    storage.SetSingleFile(True)
    assert storage.ReadData(node), f"Slicer could not read {path}"
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def ceph_as_nrrd(ceph_dir, tmp_path, case="151", spacing=(0.1, 0.1), origin=(0.0, 0.0, 0.0),
                 direction=np.eye(3)):
    itk = sitk.ReadImage(str(ceph_dir / "images" / f"{case}.jpg"))
    if itk.GetNumberOfComponentsPerPixel() > 1:
        itk = sitk.VectorIndexSelectionCast(itk, 0)
    itk = sitk.JoinSeries(itk)  # one-slice 3D volume, like a radiograph in Slicer
    itk.SetSpacing((*spacing, 1.0))
    itk.SetOrigin(origin)
    itk.SetDirection(np.asarray(direction).ravel().tolist())
    path = tmp_path / f"{case}.nrrd"
    sitk.WriteImage(itk, str(path))
    return path


@pytest.fixture(scope="module")
def truth(ceph_dir):
    return {c.case_id: c.xy for c in read_landmark_csv(ceph_dir / "test1_senior.csv")}


@pytest.fixture()
def scene():
    return new_scene()[0]


@pytest.fixture()
def logic(scene):
    return LandmarksLogic(scene)


@pytest.fixture()
def vol(scene, ceph_dir, tmp_path):
    """ISBI 151 as Slicer loads a one-slice NRRD of it (0.1 mm/pixel)."""
    return load_volume(scene, ceph_as_nrrd(ceph_dir, tmp_path))


def pixel_to_ras(volume_node, xy):
    m = ijk_to_ras(volume_node)
    ijk = np.c_[xy, np.zeros(len(xy)), np.ones(len(xy))]
    return (ijk @ m.T)[:, :3]


@pytest.mark.parametrize("geometry", [
    dict(spacing=(0.1, 0.1)),
    dict(spacing=(0.13, 0.07), origin=(25.0, -40.0, 3.0), direction=FLIP),
])
def test_detect_writes_named_points_on_the_volume_geometry(ceph_dir, tmp_path, scene, truth, geometry, logic):
    vol = load_volume(scene, ceph_as_nrrd(ceph_dir, tmp_path, **geometry))
    node = logic.detect(vol)
    assert node.GetNumberOfControlPoints() == 19 and node.GetFixedNumberOfControlPoints()
    assert [node.GetNthControlPointLabel(i) for i in range(3)] == ["S", "N", "Or"]
    assert node.GetNthControlPointDescription(0).startswith("sella (confidence ")
    # The same model on the same pixels (read independently of MRML), mapped through IJK-to-RAS.
    lm = logic.detector().detect(read_image(ceph_dir / "images" / "151.jpg"))
    expected = pixel_to_ras(vol, lm.xy)
    got = np.array([node.GetNthControlPointPosition(i) for i in range(19)])
    assert np.abs(got - expected).max() < 0.01
    # and the points are where the senior annotator put them (mm in the volume's own spacing),
    # by the protocol model: ceph-default has seen 151 in training
    unseen = logic.detect(vol, model="ceph-isbi2015")
    assert unseen is not node
    err_px = np.linalg.norm(logic.current_landmarks(vol, unseen)[1].xy - truth["151"], axis=1)
    assert np.median(err_px * 0.1) < 2.0
    rows = table_rows(node)
    assert [r["confidence"] for r in rows] == sorted(r["confidence"] for r in rows)


def test_correction_is_recorded_kept_on_redetect_and_survives_save(tmp_path, scene, vol, logic):
    node = logic.detect(vol)
    moved = np.array(node.GetNthControlPointPosition(4)) + [1.5, -2.0, 0.0]
    doubtful = [i for i in range(19) if not node.GetNthControlPointSelected(i)]
    # a move from the Markups module's table: PointModifiedEvent only, no drag events
    node.SetNthControlPointPosition(4, *moved)
    flags = corrected_flags(node)
    assert flags[4] and sum(flags) == 1
    assert node.GetNthControlPointSelected(4)  # verified: shown in the confident colour
    assert [i for i in range(19) if not node.GetNthControlPointSelected(i)] == [i for i in doubtful if i != 4]
    node.SetNthControlPointLocked(7, True)
    locked_pos = np.array(node.GetNthControlPointPosition(7)) + [0.0, 3.0, 0.0]
    node.SetNthControlPointPosition(7, *locked_pos)
    node.SetAttribute("MedSapiens.Corrected", "")  # forget the attribute: description tags remain
    again = logic.detect(vol, markups_node=node)
    assert again is node and node.GetNumberOfControlPoints() == 19
    assert np.allclose(node.GetNthControlPointPosition(4), moved)
    assert np.allclose(node.GetNthControlPointPosition(7), locked_pos)
    assert corrected_flags(node)[4]
    # save as .mrk.json through Slicer's storage node and load it back: the flag survives
    storage = scene.AddNewNodeByClass("vtkMRMLMarkupsJsonStorageNode")
    storage.SetFileName(str(tmp_path / "saved.mrk.json"))
    assert storage.WriteData(node)
    _labels, ras, descs = read_markups_with_slicer(tmp_path / "saved.mrk.json")
    assert descs[4].endswith(" [corrected]") and not descs[3].endswith(" [corrected]")
    assert np.allclose(ras[4], moved, atol=1e-4)


def test_export_writes_complete_valid_cases(ceph_dir, tmp_path, scene, logic):
    out = tmp_path / "export"
    ras_moved = None
    for case, geometry in (("151", dict(spacing=(0.1, 0.1))),
                           ("152", dict(spacing=(0.12, 0.1), origin=(5.0, 6.0, 7.0), direction=FLIP))):
        vol = load_volume(scene, ceph_as_nrrd(ceph_dir, tmp_path, case, **geometry))
        node = logic.detect(vol)
        if case == "152":
            ras_moved = np.array(node.GetNthControlPointPosition(0)) + [2.0, 2.0, 0.0]
            node.SetNthControlPointPosition(0, *ras_moved)
            node.InvokeEvent(node.PointEndInteractionEvent)
        logic.export(vol, node, out)
    index = json.loads((out / "dataset.json").read_text())
    assert [c["id"] for c in index["cases"]] == ["151", "152"]
    assert [c["corrected"] for c in index["cases"]] == [0, 1]
    mrk = out / "cases" / "152" / "landmarks.mrk.json"
    doc = json.loads(mrk.read_text())
    jsonschema.validate(doc, json.loads(SCHEMA.read_text()))
    assert doc["markups"][0]["medsapiens"]["corrected"][:2] == [True, False]
    _labels, ras, _ = read_markups_with_slicer(mrk)
    assert np.allclose(ras[0], ras_moved, atol=1e-3)
    # the exported image keeps the geometry: reload it as a volume and compare IJK-to-RAS
    vol2 = load_volume(scene, out / "cases" / "152" / "image.nrrd")
    assert np.allclose(ijk_to_ras(vol2), ijk_to_ras(scene.GetFirstNodeByName("152")), atol=1e-6)
    cases, names = read_cases(out)
    assert len(cases) == 2 and names[0] == ("S", "sella")
    assert np.allclose(pixel_to_ras(vol2, cases[1].xy[:1]), [ras_moved], atol=1e-3)
    coco = json.loads((out / "coco_keypoints.json").read_text())
    assert len(coco["images"]) == 2 and len(coco["annotations"][1]["keypoints"]) == 19 * 3
    assert coco["categories"][0]["keypoints"][0] == "S"
    assert np.allclose(coco["annotations"][1]["keypoints"][:2], cases[1].xy[0], atol=1e-6)
    rows = (out / "landmarks.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("image_path,1_x,1_y")
    # never overwritten silently; overwrite keeps the previous version
    with pytest.raises(ExportError, match="already exported"):
        logic.export(scene.GetFirstNodeByName("152"), node, out)
    logic.export(scene.GetFirstNodeByName("152"), node, out, overwrite=True)
    assert (out / "cases" / "152.previous-1" / "landmarks.mrk.json").exists()
    assert not [p for p in (out / "cases").iterdir() if p.name.startswith(".")]


CONVENTION = {5: 30.0, 15: 30.0, 6: 20.0}  # B, Pog', Gn: this site puts them 2-3 mm further right (px)


def site_truth(ceph_dir, convention=None):
    """Senior annotations of test1, moved by a site's convention (landmark -> x shift, pixels)."""
    truth = {c.case_id: c.xy for c in read_landmark_csv(ceph_dir / "test1_senior.csv")}
    for xy in truth.values():
        for k, dx in (convention or {}).items():
            xy[k, 0] += dx
    return truth


def export_corrected(ceph_dir, tmp_path, scene, logic, cases=("153", "154", "155"), convention=None):
    """Export folder of ``cases``, each corrected to the senior annotation (moved by the site's
    ``convention``) in the scene."""
    out = tmp_path / "export"
    truth = site_truth(ceph_dir, convention)
    for case in cases:
        vol = load_volume(scene, ceph_as_nrrd(ceph_dir, tmp_path, case))
        node = logic.detect(vol)
        # the clinician puts every point where the senior annotator did
        for i, (x, y) in enumerate(truth[case]):
            node.SetNthControlPointPosition(i, *pixel_to_ras(vol, np.array([[x, y]]))[0])
        node.InvokeEvent(node.PointEndInteractionEvent)
        assert all(corrected_flags(node))  # every detection differed from the annotation
        logic.export(vol, node, out)
    return out, [node.GetNthControlPointLabel(i) for i in range(node.GetNumberOfControlPoints())]


def test_finetune_from_exported_cases(ceph_dir, tmp_path, scene, logic):
    from MedSapiensLandmarksLib.logic import FinetuneJob

    out, _names = export_corrected(ceph_dir, tmp_path, scene, logic)
    lines = []
    job = FinetuneJob(out, tmp_path / "model", init="default", coarse_epochs=1, refine_epochs=1,
                      on_line=lines.append)
    result = job.wait(timeout=900)
    assert result["returncode"] == 0, "\n".join(lines[-20:])
    assert job.progress == 1.0 and not job.running
    assert result["val_cases"] == 1
    assert 0.0 < result["noise_mm"] < 1.0  # 19 paired points
    assert result["accepted"] == (result["mre_after_mm"] <= result["mre_before_mm"] + result["noise_mm"])
    kind, text = finetune_outcome(result)  # what the panel (and the web page) then say
    if result["mre_after_mm"] <= result["mre_before_mm"]:
        assert (kind, text) == ("question", f"Fine-tuned model: MRE {result['mre_after_mm']:.2f} mm on held-back "
                                            f"cases (was {result['mre_before_mm']:.2f} mm). Use it?")
    elif result["accepted"]:
        assert (kind, text) == ("question", f"Fine-tuned model: MRE {result['mre_after_mm']:.2f} mm on held-back "
                                            f"cases (was {result['mre_before_mm']:.2f} mm; the difference is within "
                                            f"the check's noise of {result['noise_mm']:.2f} mm). Use it?")
    else:
        assert (kind, text) == ("info", f"The fine-tuned model was worse on held-back cases (MRE "
                                        f"{result['mre_after_mm']:.2f} vs {result['mre_before_mm']:.2f} mm, more "
                                        f"than the check's noise of {result['noise_mm']:.2f} mm); the current "
                                        f"model is kept.")
    assert (tmp_path / "model" / "model.json").exists() and result["model"].endswith("model.json")
    card = json.loads((tmp_path / "model" / "model.json").read_text())
    assert card["training"]["train_cases"] == ["153", "154"] and card["training"]["val_cases"] == ["155"]


def test_a_fine_tune_from_the_adapted_model_ends_adapted_to_its_own_detections(ceph_dir, tmp_path, scene, logic):
    from MedSapiensLandmarksLib.logic import FinetuneJob

    out, names = export_corrected(ceph_dir, tmp_path, scene, logic, convention=CONVENTION)
    adapted = logic.adapt_to_exports(out, "default", names)  # what every Export does
    assert not adapted.withheld
    assert adapted.cases == 3
    assert adapted.scale == json.loads(adapted.card.read_text())["calibration"]["site_scale"] >= 1.0
    job = FinetuneJob(out, tmp_path / "model", init=str(adapted.card), coarse_epochs=1, refine_epochs=1)
    result = job.wait(timeout=900)
    assert result["returncode"] == 0 and result["site_layer_cases"] == 2  # the two training cases
    card = json.loads((tmp_path / "model" / "model.json").read_text())
    assert card["site_layer"]["cases"] == ["153", "154"] and card["site_layer"]["frame"] == "sn"
    assert not card["site_layer"]["withheld"]  # the convention repeats in both cases
    assert "base" not in card  # its own graphs
    # the layer moves the new model's points by the offsets fitted on its own detections
    det = Detector.load(tmp_path / "model")
    image = read_image(ceph_dir / "images" / "156.jpg", spacing=0.1)
    moved = det.detect(image)
    det.site = None
    plain = det.detect(image)
    shift = np.linalg.norm(moved.xy - plain.xy, axis=1)
    assert shift.max() > 0.5 and np.allclose(moved.meta["model_pixels"], plain.xy)
    # the clinician uses the new model on the next patient and exports the corrected case: the
    # layer is refitted from the training cases' layer plus that case, not from that case alone
    from MedSapiensLandmarksLib.adaptation import basis

    vol = load_volume(scene, ceph_as_nrrd(ceph_dir, tmp_path, "156"))
    node = logic.detect(vol, model=str(tmp_path / "model" / "model.json"))
    truth = site_truth(ceph_dir, CONVENTION)["156"]
    for i, (x, y) in enumerate(truth):
        node.SetNthControlPointPosition(i, *pixel_to_ras(vol, np.array([[x, y]]))[0])
    node.InvokeEvent(node.PointEndInteractionEvent)
    logic.export(vol, node, out)
    refit = logic.adapt_to_exports(out, str(tmp_path / "model" / "model.json"), names)
    assert refit.cases == 3
    site = json.loads(refit.card.read_text())["site_layer"]
    assert site["cases"] == ["153", "154", "156"] and site["counts"] == [3] * 19
    own = read_markups(out / "cases" / "156" / "landmarks.mrk.json")["extra"]["model_pixels"]
    own = np.array(own)
    new = (truth - own) @ np.linalg.inv(basis(own, (0.1, 0.1), names, "sn")).T
    expected = (np.array(card["site_layer"]["offsets"]) * 2.5 + new) / 3.5
    kept = np.linalg.norm((truth - own) * 0.1, axis=1) <= 10.0  # longer corrections are left out
    assert kept.all() and np.allclose(site["offsets"], expected, atol=2e-6)


def _synthetic_cases(folder, k=19, n=3):
    """``n`` exported cases of a flat picture with ``k`` points (all marked corrected)."""
    from MedSapiensLandmarksLib.export import export_case
    from MedSapiensLandmarksLib.imageio import Radiograph
    from MedSapiensLandmarksLib.landmarks import Landmarks

    a = np.array([[0.1, 0, 0], [0, 0.1, 0], [0, 0, 0.0]])
    for i in range(n):
        img = Radiograph(np.full((200, 160), 100, np.uint8), a, True, f"c{i}")
        xy = np.c_[np.linspace(40, 120, k) + i, np.full(k, 60.0)]
        lm = Landmarks([f"P{j}" for j in range(k)], ["p"] * k, xy, img.to_lps(xy), np.ones(k))
        export_case(folder, f"c{i}", img, lm, [True] * k)
    return folder


@pytest.mark.parametrize("k, n, reason", [
    (19, 1, "1 case(s) are too few to hold one back for a check (export at least 2)"),
    (3, 2, "the cases have 3 landmarks and the model 19: the two cannot be compared"),
])
def test_an_unvalidated_fine_tune_names_the_real_reason(tmp_path, k, n, reason):
    from MedSapiensLandmarksLib.logic import FinetuneJob

    job = FinetuneJob(_synthetic_cases(tmp_path / "cases", k, n), tmp_path / "model", init="default",
                      coarse_epochs=1, refine_epochs=0)
    result = job.wait(timeout=600)
    assert result["returncode"] == 0, "\n".join(job.lines[-20:])
    assert result["status"] == "unvalidated" and result["reason"] == reason
    assert finetune_outcome(result) == ("question", f"The fine-tuned model could not be checked: {reason}. "
                                                    f"Use it anyway?")
    assert Detector.load(result["model"]).names == [f"P{j}" for j in range(k)]


def test_finetune_can_be_cancelled(tmp_path):
    from MedSapiensLandmarksLib.logic import FinetuneJob

    job = FinetuneJob(_synthetic_cases(tmp_path / "cases"), tmp_path / "model", coarse_epochs=50)
    deadline = time.time() + 120
    while not any('"epoch"' in line for line in job.lines) and time.time() < deadline:
        time.sleep(0.2)  # training has started: the job's process holds torch and the cases
    assert job.running and job.epochs_done >= 1, "\n".join(job.lines[-10:])
    job.cancel()
    result = job.wait(timeout=60)
    assert result["returncode"] != 0 and result["model"] is None and not result["accepted"]
    assert not _group_alive(job.proc.pid)  # no process of the job survives
    assert not (tmp_path / "model" / "model.json").exists()


def _group_alive(pgid: int, grace: float = 5.0) -> bool:
    """Does any process of the group live ``grace`` seconds on (killed ones are reaped by init)?"""
    if sys.platform == "win32":
        return False
    deadline = time.time() + grace
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.1)
    return True


LAUNCHER = """#!/bin/sh
# Like Slicer's PythonSlicer (CTK's launcher): runs the real interpreter as its child, which
# inherits the output pipe, and forwards no signal to it.
"{python}" -c 'import time; print("started", flush=True); time.sleep(600)' &
echo $! > "{pidfile}"
wait
"""


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to read it counts as gone)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")
def test_cancel_stops_the_launcher_and_the_interpreter_it_started(tmp_path):
    from MedSapiensLandmarksLib.logic import FinetuneJob

    pidfile = tmp_path / "child.pid"
    launcher = tmp_path / "PythonSlicer"
    launcher.write_text(LAUNCHER.format(python=sys.executable, pidfile=pidfile))
    launcher.chmod(0o755)
    job = FinetuneJob(tmp_path / "cases", tmp_path / "model", python=str(launcher))
    deadline = time.time() + 30
    while not (pidfile.exists() and pidfile.read_text().strip() and job.lines) and time.time() < deadline:
        time.sleep(0.05)
    child = int(pidfile.read_text())
    assert _alive(job.proc.pid) and _alive(child) and job.running
    job.cancel(timeout=10)
    assert not _alive(job.proc.pid) and not _alive(child)
    assert not job.running  # the pipe the child held is closed: the reader thread ended
    assert job.result()["status"] == "cancelled"


STUBBORN = """#!/bin/sh
trap '' TERM
"{python}" -c 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print("started", flush=True); time.sleep(600)'
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")
def test_cancel_from_a_gui_never_blocks_on_a_tree_that_ignores_term(tmp_path):
    from MedSapiensLandmarksLib.logic import FinetuneJob

    launcher = tmp_path / "PythonSlicer"
    launcher.write_text(STUBBORN.format(python=sys.executable))
    launcher.chmod(0o755)
    job = FinetuneJob(tmp_path / "cases", tmp_path / "model", python=str(launcher))
    deadline = time.time() + 30
    while not job.lines and time.time() < deadline:
        time.sleep(0.05)
    start = time.time()
    job.cancel(timeout=3, wait=False)  # TERM is ignored: only the KILL after 3 s ends it
    returned = time.time() - start
    assert job.running  # still there: cancel did not wait for it
    while job.running and time.time() < start + 30:
        time.sleep(0.1)
    assert returned < 1.0 <= time.time() - start  # returned at once; the tree took the KILL
    assert not job.running and not _group_alive(job.proc.pid)
    assert job.result()["status"] == "cancelled"


def test_corrections_after_close_scene_are_recorded_on_the_reused_node_id(ceph_dir, tmp_path, scene, logic):
    """File > Close Scene resets node IDs: the next patient's node gets the same ID."""
    first = logic.detect(load_volume(scene, ceph_as_nrrd(ceph_dir, tmp_path, "151")))
    first_id = first.GetID()
    scene.Clear(False)
    vol = load_volume(scene, ceph_as_nrrd(ceph_dir, tmp_path, "152"))
    node = logic.detect(vol)
    assert node.GetID() == first_id and node is not first
    moved = np.array(node.GetNthControlPointPosition(9)) + [0.0, 2.5, 0.0]
    node.SetNthControlPointPosition(9, *moved)  # the drag
    node.InvokeEvent(node.PointEndInteractionEvent)
    assert corrected_flags(node)[9]
    logic.detect(vol, markups_node=node)  # re-detect keeps the corrected point
    assert np.allclose(node.GetNthControlPointPosition(9), moved)
    case = logic.export(vol, node, tmp_path / "export")
    doc = json.loads((case / "landmarks.mrk.json").read_text())
    assert doc["markups"][0]["medsapiens"]["corrected"][9] and sum(doc["markups"][0]["medsapiens"]["corrected"]) == 1
    logic.cleanup()


def test_a_node_picked_by_the_user_is_observed(tmp_path, scene, vol, logic):
    """A markups node that Detect did not create (selector, scene reload) still records drags."""
    node = logic.detect(vol)
    storage = scene.AddNewNodeByClass("vtkMRMLMarkupsJsonStorageNode")
    storage.SetFileName(str(tmp_path / "saved.mrk.json"))
    assert storage.WriteData(node)
    loaded = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    storage.SetFileName(str(tmp_path / "saved.mrk.json"))
    assert storage.ReadData(loaded)
    for i, attr in enumerate(("MedSapiens.DetectedRAS", "MedSapiens.Confidence")):
        loaded.SetAttribute(attr, node.GetAttribute(attr))  # as a saved scene (.mrml) keeps them
    logic.observe(loaded)
    logic.observe(loaded)  # idempotent
    loaded.SetNthControlPointPosition(2, *(np.array(loaded.GetNthControlPointPosition(2)) + [3.0, 0, 0]))
    assert corrected_flags(loaded) == [i == 2 for i in range(19)]


def test_landmarks_follow_the_volume_parent_transform(ceph_dir, scene, vol, logic):
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 40.0)
    matrix.SetElement(1, 3, -12.5)
    matrix.SetElement(0, 1, 0.2)  # a shear: no confusion with a plain offset
    transform.SetMatrixTransformToParent(matrix)
    vol.SetAndObserveTransformNodeID(transform.GetID())
    node = logic.detect(vol)
    assert node.GetTransformNodeID() == transform.GetID()
    # local point positions are the volume's local RAS; in the world both move together
    lm = logic.detector().detect(read_image(ceph_dir / "images" / "151.jpg"))
    local = pixel_to_ras(vol, lm.xy)
    m = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    world = (np.c_[local, np.ones(19)] @ m.T)[:, :3]
    got = np.array([node.GetNthControlPointPositionWorld(i) for i in range(19)])
    assert np.abs(got - world).max() < 0.01
    image, current = logic.current_landmarks(vol, node)
    assert np.abs(current.xy - lm.xy).max() < 1e-3  # export reads the same pixels back


def test_first_radiograph_volume_skips_label_maps(scene):
    from MedSapiensLandmarksLib.mrml import first_radiograph_volume

    assert first_radiograph_volume(scene) is None
    scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "seg")
    scene.AddNewNodeByClass("vtkMRMLDiffusionTensorVolumeNode", "dti")
    rgb = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "gray")
    assert first_radiograph_volume(scene) is rgb


def test_rgb_vector_volume_is_detected(ceph_dir, scene, logic):
    """Slicer loads a colour PNG/JPEG as a vtkMRMLVectorVolumeNode: the panel must accept it."""
    itk = sitk.ReadImage(str(ceph_dir / "images" / "151.jpg"))
    gray = sitk.GetArrayFromImage(itk)
    gray = gray[..., 0] if gray.ndim == 3 else gray
    rgb = np.repeat(gray[None, :, :, None], 3, axis=3)
    vol = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb151")
    vol.SetSpacing(0.1, 0.1, 1.0)
    vol.SetIJKToRASDirections(-1, 0, 0, 0, -1, 0, 0, 0, 1)
    import vtk.util.numpy_support as ns
    data = vtk.vtkImageData()
    data.SetDimensions(rgb.shape[2], rgb.shape[1], 1)
    data.GetPointData().SetScalars(ns.numpy_to_vtk(rgb.reshape(-1, 3), deep=True))
    vol.SetAndObserveImageData(data)
    node = logic.detect(vol)
    lm = logic.detector().detect(read_image(ceph_dir / "images" / "151.jpg"))
    got = np.array([node.GetNthControlPointPosition(i) for i in range(19)])
    assert np.abs(got - pixel_to_ras(vol, lm.xy)).max() < 0.01


def test_anatomy_of_an_official_multi_dataset_checkpoint_is_chosen_in_the_logic(tmp_path, vol, logic):
    from official_fixtures import head_state, pretrain_state, save_mmengine

    from MedSapiensLandmarksLib.errors import CheckpointError

    full = {f"backbone.{k}": v for k, v in pretrain_state().items() if k != "cls_token"}
    ckpt = tmp_path / "multi.pth"
    save_mmengine(ckpt, {**full, **head_state(88)}, 88)
    with pytest.raises(CheckpointError, match="choose the anatomy"):
        logic.detect(vol, model=str(ckpt))
    node = logic.detect(vol, model=str(ckpt), anatomy="chest")
    assert [node.GetNthControlPointLabel(i) for i in range(node.GetNumberOfControlPoints())] == \
        [f"Chest_Point{i}" for i in range(1, 7)]
    assert logic.detector("default", anatomy="chest") is logic.detector("default")  # ours: ignored


def test_measurements_follow_a_dragged_point_and_corrections_narrow_their_intervals(ceph_dir, vol, logic):
    from MedSapiensLandmarksLib import cephalometry

    node = logic.detect(vol)
    rows = {r["key"]: r for r in logic.measurements(vol, node)}
    assert len(rows) == len(cephalometry.MEASUREMENTS)
    # the same numbers as the analyses of the detection itself
    lm = logic.detector().detect(read_image(ceph_dir / "images" / "151.jpg", spacing=0.1))
    direct = cephalometry.measure_all(lm.xy, (0.1, 0.1))
    for key, row in rows.items():
        assert row["value"] == pytest.approx(float(direct[key]), abs=1e-3), key
        assert row["low"] is not None and row["high"] > row["low"], key  # calibrated model: intervals
    # drag B 2 mm backwards along the S-N direction: SNB follows, SNA does not
    b, n, s = (np.array(node.GetNthControlPointPosition(i)) for i in (5, 1, 0))
    back = (s - n) / np.linalg.norm(s - n)
    node.SetNthControlPointPosition(5, *(b + 2.0 * back))
    after = {r["key"]: r for r in logic.measurements(vol, node)}
    assert after["Steiner SNA"]["value"] == pytest.approx(rows["Steiner SNA"]["value"], abs=1e-6)
    assert after["Steiner SNB"]["value"] < rows["Steiner SNB"]["value"] - 0.5
    # B is now a clinician's point: its SNB interval is as narrow as a 0.84 point gives
    conf_b = json.loads(node.GetAttribute("MedSapiens.Confidence"))[5]
    width = after["Steiner SNB"]["high"] - after["Steiner SNB"]["low"]
    assert (width < rows["Steiner SNB"]["high"] - rows["Steiner SNB"]["low"]) == (conf_b < 0.84)


def test_tracing_lines_are_locked_follow_the_points_and_hide(vol, logic):
    from MedSapiensLandmarksLib.cephalometry import TRACING_LINES

    node = logic.detect(vol)
    assert logic.tracing(node, visible=False) == []  # hiding what was never drawn creates nothing
    lines = logic.tracing(node, visible=True)
    assert len(lines) == len(TRACING_LINES) and all(ln.GetLocked() for ln in lines)
    sn = lines[list(TRACING_LINES).index("S-N")]
    assert np.allclose(sn.GetNthControlPointPosition(0), node.GetNthControlPointPosition(0))
    node.SetNthControlPointPosition(0, *(np.array(node.GetNthControlPointPosition(0)) + [3.0, 0, 0]))
    again = logic.tracing(node, visible=False)
    assert [ln.GetID() for ln in again] == [ln.GetID() for ln in lines]  # moved, not re-created
    assert np.allclose(sn.GetNthControlPointPosition(0), node.GetNthControlPointPosition(0))
    assert not sn.GetDisplayNode().GetVisibility()


def test_verdict_reaches_the_node_and_the_exported_report(ceph_dir, tmp_path, scene, vol, logic, hand_dir):
    import pypdfium2

    from MedSapiensLandmarksLib.cards import DEFAULT_MODEL
    from MedSapiensLandmarksLib.mrml import plausibility_warning

    node = logic.detect(vol)
    assert plausibility_warning(node) == ""
    case = logic.export(vol, node, tmp_path / "export", report=True)
    pdf = pypdfium2.PdfDocument(str(case / "report.pdf"))
    assert len(pdf) == 1 and pdf[0].get_size() == pytest.approx((595.4, 841.7), abs=1.0)  # A4
    text = pdf[0].get_textpage().get_text_range()
    assert "Steiner: SNA" in text and "not a medical device" in text and DEFAULT_MODEL in text
    hand = tmp_path / "hand.nrrd"
    sitk.WriteImage(sitk.JoinSeries(sitk.ReadImage(str(hand_dir / "images" / "3143.jpg"))),
                    str(hand))
    hand_vol = load_volume(scene, hand)
    hand_node = logic.detect(hand_vol)
    assert plausibility_warning(hand_node).startswith("does not look like a lateral cephalogram")


def test_case_ids_follow_one_rule_and_export_never_renames(tmp_path):
    from MedSapiensLandmarksLib.export import export_case
    from MedSapiensLandmarksLib.imageio import Radiograph
    from MedSapiensLandmarksLib.landmarks import Landmarks

    img = Radiograph(np.full((200, 160), 100, np.uint8), np.array([[0.1, 0, 0], [0, 0.1, 0], [0, 0, 0.0]]), True)
    xy = np.array([[50.0, 60.0], [70.0, 80.0]])
    lm = Landmarks(["P1", "P2"], ["p", "p"], xy, img.to_lps(xy), np.ones(2))
    root = tmp_path / "cases"
    for bad in ("x.previous-1", "x\n", "", ".hidden", "a/b", "a" * 101, "Röntgen"):
        with pytest.raises(ExportError, match="use 1-100 letters, digits"):
            export_case(root, bad, img, lm, [False, False])
    assert not root.exists() or not any((root / "cases").iterdir())  # nothing written
    export_case(root, "x", img, lm, [False, False])
    export_case(root, "x", img, lm, [True, False], overwrite=True)  # the old one kept aside
    export_case(root, "y.v2_final-3", img, lm, [False, False])
    ids = [c["id"] for c in json.loads((root / "dataset.json").read_text())["cases"]]
    assert ids == ["x", "y.v2_final-3"]
    assert sorted(p.name for p in (root / "cases").iterdir()) == ["x", "x.previous-1", "y.v2_final-3"]
    cases, _ = read_cases(root)
    assert [c.case_id for c in cases] == ["x", "y.v2_final-3"]
    if sys.platform != "win32":  # the index and tables are as private as the case folders
        import stat

        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [*root.iterdir(), *(root / "cases").iterdir()]}
        assert {modes[n] for n in ("dataset.json", "landmarks.csv", "coco_keypoints.json")} == {0o600}
        assert modes["x"] == modes["y.v2_final-3"] == 0o700
