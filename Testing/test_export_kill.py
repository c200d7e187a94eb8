"""SIGKILL during export, many times: every case on disk is complete and valid, or absent.

A child process exports cases in a loop (overwriting, so `.previous-N` renames happen too)
and is killed at a random moment; after each kill the folder is checked, then repaired by
the next reader, and the exports go on in the same folder.  MEDSAPIENS_KILLS sets the count.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT
from MedSapiensLandmarksLib.export import read_cases
from MedSapiensLandmarksLib.imageio import read_image
from MedSapiensLandmarksLib.markups import read_markups

KILLS = int(os.environ.get("MEDSAPIENS_KILLS", "12"))

CHILD = r"""
import sys
import numpy as np
from MedSapiensLandmarksLib.landmarks import Landmarks
from MedSapiensLandmarksLib.export import export_case
from MedSapiensLandmarksLib.imageio import Radiograph

root, start = sys.argv[1], int(sys.argv[2])
a = np.array([[0.1, 0, 0], [0, 0.1, 0], [0, 0, 0.0]])
rng = np.random.default_rng(start)
image = Radiograph(rng.integers(0, 255, (600, 480), dtype=np.uint8), a, True, "synthetic")
names = [f"L{k}" for k in range(19)]
for i in range(start, start + 100000):
    xy = np.c_[np.arange(19) * 20.0 + 10, np.full(19, 10.0 + i % 500)]   # row encodes i
    lm = Landmarks(names, names, xy, image.to_lps(xy), np.full(19, 0.9), {"model": f"iter-{i}"})
    corrected = [(i >> k) & 1 == 1 for k in range(19)]                    # flags encode i
    export_case(root, f"case{i % 5}", image, lm, corrected, overwrite=True)
    print(i, flush=True)
"""


def check_case(folder):
    """A case folder is complete and self-consistent (its flags match the iteration that wrote it)."""
    doc = read_markups(folder / "landmarks.mrk.json")
    i = int(doc["extra"]["model"].split("-")[1])
    assert doc["extra"]["corrected"] == [(i >> k) & 1 == 1 for k in range(19)], folder
    assert np.allclose(doc["lps"][:, 1], (10.0 + i % 500) * 0.1), folder
    assert read_image(folder / "image.nrrd").shape == (600, 480), folder


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_export_survives_sigkill_at_random_moments(tmp_path):
    root = tmp_path / "export"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "MedSapiensLandmarks")}
    rng, start, checked = random.Random(7), 0, 0
    seen = {"temporary folder left": 0, "index behind the folders": 0, "case put back from .previous": 0}
    for _ in range(KILLS):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(start)],
                                 stdout=subprocess.PIPE, text=True, env=env)
        first = child.stdout.readline()  # one export done: the loop is running
        assert first.strip(), "export child did not start"
        time.sleep(rng.uniform(0.0, 0.6))
        child.send_signal(signal.SIGKILL)
        done = [first, *child.stdout.read().split()]
        child.wait()
        start = int(done[-1]) + 1 if done[-1].strip() else start + 1
        for folder in (root / "cases").iterdir():
            if folder.name.startswith("."):  # hidden = a temporary folder being written
                seen["temporary folder left"] += 1
                continue
            check_case(folder)
            checked += 1
        on_disk_before = sorted(d.name for d in (root / "cases").iterdir()
                                if "previous" not in d.name and not d.name.startswith("."))
        indexed = json.loads((root / "dataset.json").read_text())["cases"] if (root / "dataset.json").exists() else []
        seen["index behind the folders"] += [c["id"] for c in indexed] != on_disk_before
        cases, names = read_cases(root)  # the next reader repairs the index
        index = json.loads((root / "dataset.json").read_text())
        on_disk = sorted(d.name for d in (root / "cases").iterdir() if "previous" not in d.name)
        seen["case put back from .previous"] += len(on_disk) - len(on_disk_before)
        assert [c["id"] for c in index["cases"]] == on_disk and len(cases) == len(on_disk)
        assert names[0] == ("L0", "L0") and not list((root / "cases").glob(".*"))
        coco = json.loads((root / "coco_keypoints.json").read_text())
        assert len(coco["annotations"]) == len(on_disk)
        for ann, case in zip(coco["annotations"], cases):  # the derived files follow the cases
            assert np.allclose(np.reshape(ann["keypoints"], (-1, 3))[:, :2], case.xy, atol=1e-3)
    assert checked > KILLS  # the folders checked were real
    print(f"{KILLS} kills, {checked} case folders checked, all complete; {seen}")


def test_reader_rebuilds_derived_files_left_behind_by_a_kill(tmp_path):
    """Killed after the index but before COCO/CSV (or while replacing a case): the next reader
    notices the derived files do not match the cases and rewrites them."""
    root = tmp_path / "export"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "MedSapiensLandmarks")}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), "0"], stdout=subprocess.PIPE, text=True, env=env)
    while int(child.stdout.readline()) < 6:  # case0..case4 written, case0 and case1 replaced once
        pass
    child.kill()
    child.wait()
    read_cases(root)  # repair whatever the kill left
    coco_path = root / "coco_keypoints.json"
    stale = coco_path.read_text()
    # a kill between replacing case2 and rewriting the derived files: its markups differ from COCO
    doc = json.loads((root / "cases" / "case2" / "landmarks.mrk.json").read_text())
    point = doc["markups"][0]["controlPoints"][0]
    point["position"][1] += 5.0  # the clinician's later correction, 5 mm down
    (root / "cases" / "case2" / "landmarks.mrk.json").write_text(json.dumps(doc))
    assert coco_path.read_text() == stale
    cases, _ = read_cases(root)
    coco = json.loads(coco_path.read_text())
    case2 = next(c for c in cases if c.case_id == "case2")
    ann = coco["annotations"][[c.case_id for c in cases].index("case2")]
    assert np.allclose(np.reshape(ann["keypoints"], (-1, 3))[:, :2], case2.xy, atol=1e-3)
    assert coco_path.read_text() != stale
    csv_rows = (root / "landmarks.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + len(cases)
