import hashlib
import time

import numpy as np
import pytest

from MedSapiensLandmarksLib.errors import CheckpointError
from MedSapiensLandmarksLib.detector import Detector
from MedSapiensLandmarksLib.imageio import read_image
from MedSapiensLandmarksLib.weights import fetch


@pytest.fixture(scope="module")
def det():
    return Detector.load("default", device="cpu")


@pytest.fixture(scope="module")
def images(ceph_dir):
    return [read_image(ceph_dir / "images" / f"{i}.jpg", spacing=0.1) for i in ("151", "301")]


def test_batch_equals_single_and_runs_repeat_exactly(det, images):
    batch = det.detect_batch(images)
    for one, image in zip(batch, images):
        single = det.detect(image)
        assert np.abs(single.xy - one.xy).max() < 1e-3
        assert np.array_equal(det.detect(image).xy, single.xy)  # deterministic


def test_spacing_scales_physical_positions_only(det, images):
    a = det.detect(images[0])
    b = det.detect(images[0].with_spacing(0.2))
    assert np.array_equal(a.xy, b.xy)
    assert np.allclose(b.lps[:, :2], 2 * a.lps[:, :2])


def test_flip_test_agrees_with_plain_inference(det, images):
    plain = det.detect(images[0])
    det.card["coarse"]["input"]["flip_test"] = True
    try:
        flipped = det.detect(images[0])
    finally:
        det.card["coarse"]["input"]["flip_test"] = False
    d = np.linalg.norm(plain.xy - flipped.xy, axis=1) * 0.1
    assert np.median(d) < 1.0 and not np.array_equal(plain.xy, flipped.xy)


def test_fetch_checks_sha256_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSAPIENS_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "weights.bin"
    src.write_bytes(b"medsapiens" * 1000)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    got = fetch(str(src), digest)
    assert got.read_bytes() == src.read_bytes() and str(got).startswith(str(tmp_path / "cache"))
    src.unlink()
    assert fetch(str(src), digest) == got  # served from the cache, source no longer needed
    bad = tmp_path / "other.bin"
    bad.write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match="does not match"):
        fetch(str(bad), "0" * 64)
    assert not list((tmp_path / "cache").rglob("other.bin")) and not list((tmp_path / "cache").rglob("*.part"))
    with pytest.raises(CheckpointError, match="download failed.*local path"):
        fetch("http://127.0.0.1:9/none.safetensors", "0" * 64)


def test_bench_stages_account_for_the_time_and_a_slowed_stage_shows_as_that_stage(ceph_dir, monkeypatch):
    from MedSapiensLandmarksLib import detector
    from MedSapiensLandmarksLib.bench import bench_image

    image = ceph_dir / "images" / "151.jpg"
    parts = ["read", "preprocess", "forward", "decode", "refine", "write_mrk"]
    base = bench_image(image, repeat=3)["stages_s"]  # medians of 3: steady on a loaded machine
    # every lap of the pipeline is reported: in each run the stages cover the end-to-end time
    # (within 5 %: a step outside every lap would show) and their medians add up to about it
    assert -1e-6 < base["unaccounted"] < 0.05 * base["end_to_end_mrk"]
    assert sum(base[p] for p in parts) == pytest.approx(base["end_to_end_mrk"], rel=0.25)
    assert base["end_to_end_mrk_png"] > base["end_to_end_mrk"]
    real = detector.Detector._coarse_input  # framing the whole image: the preprocess stage only

    def slow_framing(self, images):
        time.sleep(0.6)
        return real(self, images)

    monkeypatch.setattr(detector.Detector, "_coarse_input", slow_framing)
    slow = bench_image(image, repeat=3)["stages_s"]
    assert 0.55 < slow["preprocess"] - base["preprocess"] < 0.9  # the delay lands in its own stage
    # and in the end-to-end time (compared with the delay itself: a difference of two end-to-end
    # medians swings by a second when other jobs share the two cores)
    assert slow["end_to_end_mrk"] > 0.6 + base["read"] + base["forward"]
    others = {p: round(slow[p] - base[p], 3) for p in parts if p != "preprocess"}
    assert max(others.values()) < 0.4, others  # and in no other stage (0.6 s would show; load moves ~0.3)


def test_model_url_is_fetched_checked_and_loaded(tmp_path, monkeypatch):
    import torch

    from MedSapiensLandmarksLib.cards import resolve
    from official_fixtures import head_state, pretrain_state

    monkeypatch.setenv("MEDSAPIENS_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "medsapiens_full.pth"
    torch.save({"state_dict": {**{f"backbone.{k}": v for k, v in pretrain_state().items()},
                               **head_state(19)}}, ckpt)
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    url = ckpt.as_uri()
    with pytest.raises(CheckpointError, match="needs '#sha256="):
        resolve(url)
    det = Detector.load(f"{url}#sha256={digest}", device="cpu")
    assert len(det.names) == 19 and det.card["coarse"]["net"]["family"] == "sapiens"
    assert list((tmp_path / "cache").rglob("medsapiens_full.pth"))


def test_left_facing_cephalogram_is_detected_like_the_right_facing_one(det, images):
    from MedSapiensLandmarksLib.imageio import Radiograph

    image = images[0]
    mirror = Radiograph(np.ascontiguousarray(image.pixels[:, ::-1]), image.pixel_to_lps, True)
    a, b = det.detect(image), det.detect(mirror)
    back = b.xy.copy()
    back[:, 0] = image.shape[1] - 1 - back[:, 0]
    assert np.abs(back - a.xy).max() * 0.1 < 0.1  # mm
    # the nets are not exactly mirror-symmetric: the calibrated confidences (slope 1.4 on the
    # logit) differ by up to 0.03 here; the same points are flagged in both orientations
    assert np.abs(a.confidence - b.confidence).max() < 0.05
    assert np.array_equal(a.confidence < 0.5, b.confidence < 0.5)


def test_landmarks_agree_across_thread_counts(images):
    # Measured: bit-identical on 151.jpg, 2.7e-5 px apart on 301.jpg (float summation order).
    one = Detector.load("default", device="cpu", threads=1).detect(images[1])
    two = Detector.load("default", device="cpu", threads=2).detect(images[1])
    assert np.abs(one.xy - two.xy).max() < 1e-3  # px, i.e. 1e-4 mm
    assert np.abs(one.confidence - two.confidence).max() < 1e-4


def test_shipped_hand_model_finds_hand_landmarks(ceph_dir, hand_dir):
    from MedSapiensLandmarksLib.datasets import read_landmark_csv
    from MedSapiensLandmarksLib.metrics import hand_scale

    hands = [c for c in read_landmark_csv(hand_dir / "landmarks.csv") if c.split == "valid"]
    hand = Detector.load("hand-default", device="cpu")
    assert len(hand.names) == 37
    case = hands[0]
    lm = hand.detect(read_image(case.image))
    err_mm = np.linalg.norm(lm.xy - case.xy, axis=1) * hand_scale(case.xy[None])[0]
    assert np.median(err_mm) < 2.0 and (err_mm < 4.0).mean() > 0.9, err_mm.round(2)


def test_bench_batch_and_random_sapiens_path(ceph_dir, tmp_path):
    from MedSapiensLandmarksLib.bench import bench_batch, bench_image, sapiens_random

    for n in ("151", "152", "153"):
        (tmp_path / f"{n}.jpg").symlink_to(ceph_dir / "images" / f"{n}.jpg")
    (tmp_path / "bad.png").write_text("no")
    t0 = time.perf_counter()
    res = bench_batch(tmp_path, count=4, workers=1)
    wall = time.perf_counter() - t0
    assert res["images"] == 4 and res["failures"] == 1
    # the timed part is the batch itself: inside the stopwatch around the whole call (which also
    # loads the model), and most of it (loading the ONNX model takes well under half)
    assert 0.5 * wall < res["seconds"] < wall
    from MedSapiensLandmarksLib.bench import markdown
    text = markdown({"batch": res}, "bench x")
    assert text.startswith("### bench run ") and "4 images" in text and "`bench x`" in text
    det = sapiens_random("sapiens_tiny")
    assert det.card["coarse"]["input"]["size"] == [1024, 768] and det.nets["coarse"].heatmap_stride == 4
    res = bench_image(ceph_dir / "images" / "151.jpg", repeat=1, det=det)
    assert res["model"] == "sapiens_tiny (random weights)" and res["raw_forward_s"] > 0
    assert res["stages_s"]["forward"] > 0


def test_model_folder_published_as_a_zip_is_fetched_unpacked_and_loaded(tmp_path, monkeypatch, det, images):
    import zipfile

    from MedSapiensLandmarksLib.cards import resolve

    monkeypatch.setenv("MEDSAPIENS_CACHE", str(tmp_path / "cache"))
    folder = resolve("default").parent
    archive = tmp_path / "ceph-release.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in folder.iterdir():
            zf.write(f, f"ceph-release/{f.name}")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    url = f"{archive.as_uri()}#sha256={digest}"
    card = resolve(url)
    assert card.name == "model.json" and str(card).startswith(str(tmp_path / "cache"))
    assert resolve(url) == card  # unpacked once, then served from the cache
    got = Detector.load(url).detect(images[0])
    assert np.abs(got.xy - det.detect(images[0]).xy).max() < 0.01
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escape/model.json", "{}")
    with pytest.raises(CheckpointError, match="refused archive member"):
        resolve(f"{evil.as_uri()}#sha256={hashlib.sha256(evil.read_bytes()).hexdigest()}")
    assert not (tmp_path / "cache" / "escape").exists()


def test_release_0_1_models_in_safetensors_still_load_on_torch(tmp_path, det, images):
    """Card format 1 (model.safetensors, float16 by parameter name) runs on the torch backend."""
    import json

    import torch
    from safetensors.torch import save_file

    from MedSapiensLandmarksLib.cards import CARD_FORMAT_SAFETENSORS

    torch_det = Detector.load("default", backend="torch")
    state = torch.nn.ModuleDict(torch_det.nets).state_dict()
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()},
              str(tmp_path / "model.safetensors"))
    card = {k: v for k, v in torch_det.card.items() if k != "graphs"}
    card.update(format=CARD_FORMAT_SAFETENSORS, weights="model.safetensors")
    (tmp_path / "model.json").write_text(json.dumps(card))
    old = Detector.load(tmp_path)
    assert old.backend.name == "torch"
    assert np.abs(old.detect(images[0]).xy - det.detect(images[0]).xy).max() < 0.01
    with pytest.raises(CheckpointError, match="runs on the torch backend only"):
        Detector.load(tmp_path, backend="onnx")
