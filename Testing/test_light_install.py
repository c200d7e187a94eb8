"""The light install: detection, the Slicer panel's Lib modules and the CLI without torch.

Each test runs a fresh interpreter in which importing torch, torchvision or timm raises
ModuleNotFoundError (as on a fresh Slicer, before the PyTorch extension installed anything).
"""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT

BLOCK = textwrap.dedent("""
    import importlib.abc, sys
    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in {"torch", "torchvision", "timm"}:
                raise ModuleNotFoundError(f"{name}: blocked (light install)", name=name.split(".")[0])
    sys.meta_path.insert(0, NoTorch())
    sys.path[:0] = [%r, %r]
""") % (str(ROOT / "MedSapiensLandmarks"), str(ROOT / "Testing"))
LIGHT = ["adaptation", "analysis", "atomic", "backends", "batch", "bench", "calibration", "cards", "cli", "codec",
         "datasets", "detector", "errors", "evaluation", "export", "gateway", "imageio", "inputs", "install",
         "landmarks", "loading", "logic", "markups", "metrics", "mrml", "overlay", "panel", "report", "site_model",
         "weights", "web"]
TORCH = ["checkpoints", "model", "official", "onnx_io", "training"]


def run_light(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=300)


def test_the_blocker_blocks():
    res = run_light("import torch")
    assert res.returncode != 0 and "blocked (light install)" in res.stderr


def test_every_light_module_imports_and_the_widget_table_builds_from_a_real_node():
    res = run_light("""
        import importlib, json, sys
        import numpy as np
        for name in %r:
            importlib.import_module("MedSapiensLandmarksLib." + name)
        from MedSapiensLandmarksLib.landmarks import Landmarks
        from MedSapiensLandmarksLib.mrml import landmarks_to_node, table_rows
        from MedSapiensLandmarksLib.logic import LandmarksLogic
        from slicer_helpers import new_scene
        scene, _ = new_scene()
        xy = np.array([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]])
        lm = Landmarks(["S", "N", "Or"], ["sella", "nasion", "orbitale"], xy,
                       np.c_[xy, np.zeros(3)], np.array([0.9, 0.2, 0.6]))
        node = landmarks_to_node(scene, lm)
        LandmarksLogic(scene).observe(node)
        node.SetNthControlPointPosition(2, 1.0, 2.0, 3.0)
        print(json.dumps({"rows": table_rows(node),
                          "heavy": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm"))}))
    """ % LIGHT)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    assert [(r["name"], r["corrected"]) for r in out["rows"]] == [("N", False), ("Or", True), ("S", False)]
    assert [r["confidence"] for r in out["rows"]] == [0.2, 0.6, 0.9]


def test_torch_modules_need_torch():
    res = run_light("""
        import importlib
        failed = []
        for name in %r:
            try:
                importlib.import_module("MedSapiensLandmarksLib." + name)
            except ModuleNotFoundError as err:
                failed.append((name, err.name))
        print(failed)
    """ % TORCH)
    # model.py imports timm first (also blocked); the others torch
    assert res.stdout.strip() == str([(name, "timm" if name == "model" else "torch") for name in TORCH]), \
        res.stderr[-1000:]


@pytest.mark.parametrize("what", ["torch backend", "official checkpoint", "sapiens bench"])
def test_commands_that_need_torch_name_the_extra_to_install(what, ceph_dir, tmp_path):
    """What a user of the light install sees on each path into the torch modules (checkpoints,
    model, onnx_io: the torch backend; official: a .pth; model + official: bench --sapiens)."""
    image = str(ceph_dir / "images" / "151.jpg")
    (tmp_path / "medsapiens.pth").write_bytes(b"")
    args = {"torch backend": ["detect", image, "-o", str(tmp_path / "out"), "--backend", "torch"],
            "official checkpoint": ["detect", image, "-o", str(tmp_path / "out"), "--model",
                                    str(tmp_path / "medsapiens.pth")],
            "sapiens bench": ["bench", image, "--sapiens", "0.3b", "--repeat", "1"]}[what]
    res = run_light("""
        import sys
        from MedSapiensLandmarksLib.cli import main
        sys.exit(main(sys.argv[1:]))
    """, *args)
    assert res.returncode == 2, res.stderr[-1000:]
    assert res.stderr.strip() == (f"error: {args[0]} needs torch, which the light install leaves out: "
                                  "pip install 'medsapiens-landmarks[train]'")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing half-written


def test_cli_detect_runs_an_onnx_model_without_torch(ceph_dir, tmp_path):
    from MedSapiensLandmarksLib.detector import Detector
    from MedSapiensLandmarksLib.imageio import read_image
    from MedSapiensLandmarksLib.markups import read_markups

    model = Detector.load("default", backend="torch")
    assert model.card["format"] == "medsapiens-landmarks-model/2"  # ONNX graphs, as every shipped model
    path = "default"
    res = run_light("""
        import sys
        from MedSapiensLandmarksLib.cli import main
        rc = main(sys.argv[1:])
        assert not any(m.split(".")[0] == "torch" for m in sys.modules)
        sys.exit(rc)
    """, "detect", str(ceph_dir / "images" / "151.jpg"), "-o", str(tmp_path / "out"), "--spacing",
        "0.1", "--model", path, "--format", "mrk.json,png")
    assert res.returncode == 0, res.stderr[-2000:]
    got = read_markups(tmp_path / "out" / "151.mrk.json")
    torch_xy = model.detect(read_image(ceph_dir / "images" / "151.jpg", spacing=0.1)).xy
    onnx_xy = np.array(got["extra"]["pixels"])
    assert np.abs(onnx_xy - torch_xy).max() < 0.01  # px
    assert (tmp_path / "out" / "151.overlay.png").stat().st_size > 10_000


def test_train_without_torch_says_which_extra_to_install(tmp_path):
    res = run_light("""
        import sys
        from MedSapiensLandmarksLib.cli import main
        sys.exit(main(sys.argv[1:]))
    """, "train", "--csv", str(tmp_path / "x.csv"), "-o", str(tmp_path / "m"))
    assert res.returncode == 2, res.stderr[-1000:]
    assert res.stderr.strip() == ("error: train needs torch, which the light install leaves out: "
                                  "pip install 'medsapiens-landmarks[train]'")
