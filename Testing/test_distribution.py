"""Distribution: int8 weight storage, the model index and its downloads, the extension's own
repository and the wheel, each checked the way a user or the Extensions Index meets them."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from asset_server import serve
from conftest import ROOT, SHARED
from test_extension_packaging import cmake_list
from MedSapiensLandmarksLib import cards
from MedSapiensLandmarksLib.catalog import EMBEDDED, INDEX_NAME, embedded_dir, read_index
from MedSapiensLandmarksLib.detector import Detector
from MedSapiensLandmarksLib.errors import CheckpointError
from MedSapiensLandmarksLib.imageio import read_image
from MedSapiensLandmarksLib.model import LandmarkNet
from MedSapiensLandmarksLib.onnx_io import export_graph, read_graph_weights
from MedSapiensLandmarksLib.quantize import quantize_weights
from MedSapiensLandmarksLib.release import build_assets, build_extension_repo, release_folders

MODELS = ROOT / "MedSapiensLandmarks" / "Resources" / "Models"


def files_under(path):
    return sorted(p for p in path.rglob("*") if p.is_file())


def test_int8_weights_are_within_half_a_step_and_the_graph_computes_the_same_heatmaps(tmp_path):
    torch.manual_seed(0)
    net = LandmarkNet({"family": "unet", "encoder": "resnet10t", "in_chans": 1, "out_stride": 2,
                       "decoder_channels": [32, 16], "encoder_depth": 3, "num_keypoints": 5}).eval()
    f16 = export_graph(net, (1, 64, 64), tmp_path / "f16.onnx")
    converted = quantize_weights(f16, tmp_path / "int8.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node]
    assert converted == ops.count("DequantizeLinear") > 5
    before, after = read_graph_weights(f16), read_graph_weights(tmp_path / "int8.onnx")
    assert before.keys() == after.keys()
    for name, w in before.items():
        if name in {n.input[0] for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node
                    if n.op_type == "DequantizeLinear"}:
            step = np.abs(w.reshape(len(w), -1)).max(1) / 127  # one int8 step per output channel
            err = np.abs(after[name] - w).reshape(len(w), -1).max(1)
            assert (err <= step / 2 + 1e-7).all(), name
        else:
            assert np.array_equal(after[name], w), name  # BatchNorm, biases: float16 as before
    import onnxruntime as ort

    x = np.random.default_rng(0).normal(size=(2, 1, 64, 64)).astype(np.float32)
    a, b = (ort.InferenceSession(str(p)).run(None, {"input": x})[0] for p in (f16, tmp_path / "int8.onnx"))
    assert np.abs(a - b).max() < 0.02 * np.abs(a).max()
    assert (tmp_path / "int8.onnx").stat().st_size < 0.6 * f16.stat().st_size


def test_shipped_graphs_are_int8_and_read_back_as_float_weights():
    for folder in release_folders():
        for graph in ("coarse.onnx", "refine.onnx"):
            model = onnx.load(str(folder / graph))
            assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) >= 15, folder.name
            weights = read_graph_weights(folder / graph)
            assert all(w.dtype == np.float32 and np.isfinite(w).all() for w in weights.values())


def test_release_zips_are_reproducible_and_the_index_in_the_tree_lists_them(tmp_path):
    folders = release_folders()
    first = json.loads(build_assets(folders, tmp_path / "a").read_text())["models"]
    second = json.loads(build_assets(folders, tmp_path / "b").read_text())["models"]
    assert first == second and set(first) == {f.name for f in folders}
    for name, entry in first.items():
        archive = tmp_path / "a" / entry["url"].rsplit("/", 1)[1]
        assert hashlib.sha256(archive.read_bytes()).hexdigest() == entry["sha256"]
        assert archive.stat().st_size == entry["size"] <= 30e6
        with zipfile.ZipFile(archive) as zf:
            assert sorted(zf.namelist()) == sorted(f"{name}/{p.name}" for p in (MODELS / name).iterdir())
    assert read_index(embedded_dir() / INDEX_NAME) == first  # `release --update-index` wrote it


@pytest.fixture
def published(tmp_path, monkeypatch):
    """hand-dha published on a loopback server and held by no models folder."""
    dist = tmp_path / "dist"
    dist.mkdir()
    (tmp_path / "embedded").mkdir()
    with serve(dist) as server:
        index = build_assets([MODELS / "hand-dha"], dist, base_url=server["url"])
        monkeypatch.setenv("MEDSAPIENS_MODEL_INDEX", str(index))
        monkeypatch.setenv("MEDSAPIENS_CACHE", str(tmp_path / "cache"))
        monkeypatch.delenv("MEDSAPIENS_MODELS", raising=False)
        monkeypatch.setattr(cards, "embedded_dir", lambda: tmp_path / "embedded")
        server["index"], server["cache"] = index, tmp_path / "cache"
        yield server


def test_an_index_model_downloads_once_with_progress_and_runs_like_the_original(published, hand_dir, tmp_path,
                                                                                capsys):
    entry = read_index()["hand-dha"]
    assert "hand-dha" in cards.model_names() and cards.needs_download("hand-dha") == entry
    seen = []
    card = cards.resolve("hand-dha", progress=lambda done, total: seen.append((done, total)))
    assert published["requests"] == [f"/hand-dha-{entry['version']}.zip"]
    assert seen[-1] == (entry["size"], entry["size"])
    assert card.is_relative_to(published["cache"]) and cards.needs_download("hand-dha") is None
    assert cards.resolve("hand-dha") == card and len(published["requests"]) == 1  # cached: no request
    image = read_image(next((hand_dir / "images").iterdir()), spacing=0.1)
    got = Detector.load("hand-dha").detect(image)
    original = Detector.load(MODELS / "hand-dha").detect(image)
    assert np.array_equal(got.xy, original.xy) and len(got.xy) == 37
    from MedSapiensLandmarksLib.cli import main

    shutil.rmtree(published["cache"])
    assert main(["detect", str(image.path), "--model", "hand-dha", "-o", str(tmp_path / "out"), "-q"]) == 0
    assert "downloading hand-dha" in capsys.readouterr().err and len(published["requests"]) == 2
    assert (tmp_path / "out" / f"{Path(image.path).stem}.mrk.json").exists()


@pytest.mark.parametrize("fault", ["digest", "truncated", "size"])
def test_a_bad_download_is_refused_with_one_error_and_leaves_nothing_in_the_cache(published, fault):
    index = json.loads(published["index"].read_text())
    entry = index["models"]["hand-dha"]
    if fault == "digest":
        entry["sha256"] = hashlib.sha256(b"another file").hexdigest()
        message = "does not match"
    elif fault == "size":
        entry["size"] -= 1000
        message = "more than the"
    else:
        published["truncate"].add(entry["url"].rsplit("/", 1)[1])
        message = r"stopped at \d+ of \d+ bytes"
    published["index"].write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=message):
        cards.resolve("hand-dha")
    assert files_under(published["cache"]) == []
    published["truncate"].clear()
    if fault == "truncated":  # a later try, once the network is back, succeeds
        assert cards.resolve("hand-dha").exists()


def test_the_extension_repository_is_one_small_commit_the_index_checks_accept(tmp_path):
    repo = build_extension_repo(ROOT, tmp_path / "SlicerMedSapiensLandmarks")
    clone = tmp_path / "clone"  # the Index clones with the whole history for a branch revision
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", "main"], cwd=clone, check=True)
    size_mb = sum(p.stat().st_size for p in files_under(clone)) / 2**20  # .git included, as the Index counts
    assert size_mb <= 60, size_mb
    count = subprocess.run(["git", "rev-list", "--count", "HEAD"], cwd=clone, capture_output=True, text=True)
    assert count.stdout.strip() == "1"
    models = clone / "MedSapiensLandmarks" / "Resources" / "Models"
    assert sorted(p.name for p in models.iterdir()) == sorted([*EMBEDDED, INDEX_NAME])
    module = clone / "MedSapiensLandmarks"
    listed = cmake_list((module / "CMakeLists.txt").read_text(), "MODULE_PYTHON_RESOURCES")
    assert listed == {str(p.relative_to(module)) for p in files_under(module / "Resources")}
    assert not (clone / "Testing").exists() and (clone / "LICENSE").read_text().startswith("BSD 3-Clause")
    # the catalog entry as the Index validates it: schema, name = CMake project, Slicer-prefixed repository
    import jsonschema

    entry = json.loads((clone / "MedSapiensLandmarks.json").read_text())
    schema = json.loads((SHARED / "reference" / "slicer-extension-catalog-entry-schema-v1.0.1.json").read_text())
    jsonschema.validate(entry, schema)
    assert "project(MedSapiensLandmarks)" in (clone / "CMakeLists.txt").read_text()
    assert entry["scm_url"].rstrip("/").removesuffix(".git").rsplit("/", 1)[1].startswith("Slicer")
    # from the clone alone: the embedded model, and every other one by name through the index
    code = ("from MedSapiensLandmarksLib import cards; print(sorted(p.name for f in cards.model_folders() "
            "for p in f.iterdir() if p.is_dir())); print(cards.model_names()); print(cards.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=module, capture_output=True, text=True, check=True,
                         env={"PATH": "", "HOME": str(tmp_path)}).stdout.splitlines()
    assert out[0] == str(list(EMBEDDED)) and set(eval(out[1])) == {f.name for f in release_folders()}
    assert out[2].startswith(str(module))


def test_the_wheel_installs_alone_and_detects_with_the_embedded_and_a_downloaded_model(tmp_path, ceph_dir,
                                                                                        hand_dir):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "-o", str(dist), str(ROOT)], check=True,
                   capture_output=True)
    wheel, sdist = next(dist.glob("*.whl")), next(dist.glob("*.tar.gz"))
    assert wheel.stat().st_size <= 50e6 and sdist.stat().st_size <= 50e6
    with zipfile.ZipFile(wheel) as zf:
        models = {n.split("/")[2] for n in zf.namelist() if n.startswith("MedSapiensLandmarksLib/models/")}
    assert models == {*EMBEDDED, INDEX_NAME}
    # a fresh venv, dependencies (not this package) from the test environment, nothing of the tree
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / ("Scripts" if sys.platform == "win32" else "bin") / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (Path(purelib) / "test-deps.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MEDSAPIENS"))}
    env["MEDSAPIENS_CACHE"] = str(tmp_path / "cache")
    cli = [str(python), "-m", "MedSapiensLandmarksLib.cli"]
    where = subprocess.run([str(python), "-c", "import MedSapiensLandmarksLib as m; print(m.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(purelib)
    subprocess.run([*cli, "detect", str(ceph_dir / "images" / "151.jpg"), "--spacing", "0.1", "-o", "out", "-q"],
                   cwd=tmp_path, env=env, check=True)
    points = json.loads((tmp_path / "out" / "151.mrk.json").read_text())["markups"][0]["controlPoints"]
    assert len(points) == 19 and (tmp_path / "out" / "151.overlay.png").stat().st_size > 10_000
    assets = tmp_path / "assets"
    assets.mkdir()
    with serve(assets) as server:
        env["MEDSAPIENS_MODEL_INDEX"] = str(build_assets([MODELS / "hand-default"], assets, server["url"]))
        hand = next((hand_dir / "images").iterdir())
        for _ in range(2):  # the second run finds the model in the cache
            subprocess.run([*cli, "detect", str(hand), "--model", "hand-default", "-o", "hand", "-q"],
                           cwd=tmp_path, env=env, check=True, capture_output=True)
        assert len(server["requests"]) == 1
    points = json.loads((tmp_path / "hand" / f"{hand.stem}.mrk.json").read_text())["markups"][0]["controlPoints"]
    assert len(points) == 37


def test_the_panel_lists_index_models_and_downloads_the_chosen_one_once(published):
    from slicer_helpers import new_scene
    from slicer_reference import VERSIONS, reference_slicer
    from MedSapiensLandmarksLib.logic import LandmarksLogic
    from MedSapiensLandmarksLib.panel import PanelController, model_choices

    size_mb = f"{read_index()['hand-dha']['size'] / 1e6:.0f} MB"
    listed = f"hand-dha: 37 landmarks on a hand radiograph; downloaded once, {size_mb}"
    assert dict(model_choices()) == {"hand-dha": listed}
    scene = new_scene()[0]
    with reference_slicer(VERSIONS[-1], scene) as module:
        p = module.MedSapiensLandmarksLogic().getParameterNode()
        panel = PanelController(LandmarksLogic(scene))
        p.model = "hand-dha"
        assert panel.download_needed(p)["sha256"] == read_index()["hand-dha"]["sha256"]
        seen = []
        panel.download(p, lambda done, total: seen.append(done))
        assert seen[-1] == read_index()["hand-dha"]["size"] and panel.download_needed(p) is None
        assert panel.dependencies(p) == "onnx" and len(published["requests"]) == 1
    assert dict(model_choices()) == {"hand-dha": "hand-dha: 37 landmarks on a hand radiograph"}


def test_the_web_page_lists_index_models_and_downloads_the_chosen_one_in_the_background(published, hand_dir,
                                                                                        tmp_path):
    import time

    from MedSapiensLandmarksLib.web import LandmarksWebApp

    app = LandmarksWebApp(server="download-test", export_dir=tmp_path / "cases", model=str(MODELS / "ceph-default"),
                          uploads=tmp_path / "uploads")
    state = app.server.state
    assert [m["value"] for m in state.models] == ["hand-dha"]
    app.on_model(model="hand-dha")
    assert state.downloading and state.status.startswith("downloading hand-dha (once)")
    deadline = time.time() + 60
    while not app.download.finished and time.time() < deadline:
        time.sleep(0.1)
    app.poll()
    assert app.model == "hand-dha" and state.status == "model: hand-dha (downloaded and checked)"
    assert not state.downloading and len(published["requests"]) == 1
    app.load(next((hand_dir / "images").iterdir()))
    app.detect()
    assert app.markups.GetNumberOfControlPoints() == 37


def test_a_path_that_looks_like_a_name_is_a_path(tmp_path, monkeypatch):
    """`./ceph-default` is the folder here, not the embedded model of that name."""
    mine = tmp_path / "ceph-default"
    shutil.copytree(MODELS / "hand-dha", mine)
    monkeypatch.chdir(tmp_path)
    assert cards.resolve("./ceph-default").resolve() == mine / "model.json"
    assert cards.resolve("ceph-default") == MODELS / "ceph-default" / "model.json"
