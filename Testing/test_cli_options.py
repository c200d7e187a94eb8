"""The CLI options the README documents, each checked against an independent expectation."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from MedSapiensLandmarksLib.cli import UsageError, main, shard
from MedSapiensLandmarksLib.datasets import read_landmark_csv
from MedSapiensLandmarksLib.detector import Detector
from MedSapiensLandmarksLib.imageio import read_image
from MedSapiensLandmarksLib.markups import read_markups


def test_shards_partition_the_input_exactly(tmp_path, monkeypatch):
    files = [tmp_path / f"{i:02d}.png" for i in range(10)]
    parts = [shard(list(reversed(files)), f"{k}/3") for k in range(3)]
    assert sorted(p for part in parts for p in part) == files  # every file once
    assert [len(p) for p in parts] == [4, 3, 3]
    for k in range(3):  # torchrun's and Slurm's variables name the same shares
        monkeypatch.setenv("RANK", str(k))
        monkeypatch.setenv("WORLD_SIZE", "3")
        assert shard(files, "env") == parts[k]
        monkeypatch.delenv("RANK")
        monkeypatch.delenv("WORLD_SIZE")
        monkeypatch.setenv("SLURM_PROCID", str(k))
        monkeypatch.setenv("SLURM_NTASKS", "3")
        assert shard(files, "env") == parts[k]
    monkeypatch.delenv("SLURM_PROCID")
    with pytest.raises(UsageError, match="are not set"):
        shard(files, "env")
    for bad, message in (("3/3", "K must be in 0..N-1"), ("a/b", "expected K/N")):
        with pytest.raises(UsageError, match=message):
            shard(files, bad)


@pytest.fixture(scope="module")
def three(ceph_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("three")
    for case in ("151", "152", "153"):
        (folder / f"{case}.jpg").symlink_to(ceph_dir / "images" / f"{case}.jpg")
    return folder


def pixels(path):
    return np.array(read_markups(path)["extra"]["pixels"])


def test_shard_and_reader_workers_on_a_folder(three, tmp_path):
    assert main(["detect", str(three), "-o", str(tmp_path / "one"), "--spacing", "0.1", "-q", "--format",
                 "mrk.json", "--workers", "0"]) == 0
    assert main(["detect", str(three), "-o", str(tmp_path / "two"), "--spacing", "0.1", "-q", "--format",
                 "mrk.json", "--workers", "2"]) == 0
    for case in ("151", "152", "153"):  # two reader processes: the same points as none
        assert np.array_equal(pixels(tmp_path / "one" / f"{case}.mrk.json"),
                              pixels(tmp_path / "two" / f"{case}.mrk.json"))
    assert main(["detect", str(three), "-o", str(tmp_path / "s"), "--spacing", "0.1", "-q", "--format",
                 "mrk.json", "--shard", "1/2"]) == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["152.mrk.json"]  # sorted, every 2nd from 1


def test_flip_averages_with_the_mirror_image_and_device_cpu_runs_onnx(ceph_dir, tmp_path):
    image = ceph_dir / "images" / "151.jpg"
    for name, extra in (("plain", []), ("flip", ["--flip"]), ("cpu", ["--device", "cpu"])):
        assert main(["detect", str(image), "-o", str(tmp_path / name), "--spacing", "0.1", "-q",
                     "--format", "mrk.json", *extra]) == 0
    plain, flip = pixels(tmp_path / "plain" / "151.mrk.json"), pixels(tmp_path / "flip" / "151.mrk.json")
    moved = np.linalg.norm(plain - flip, axis=1) * 0.1
    assert moved.max() > 0.01 and np.median(moved) < 1.0  # averaged, not replaced
    # --device cpu is the default path: ONNX Runtime, the same points
    assert np.array_equal(pixels(tmp_path / "cpu" / "151.mrk.json"), plain)
    det = Detector.load("default", device="cpu")
    assert det.backend.name == "onnx"


def test_axis_picks_the_slice_plane_of_a_3d_volume(tmp_path, ceph_dir):
    """A volume whose i-slice 1 is the cephalogram: --axis 0 --slice 1 finds it there."""
    ceph = sitk.GetArrayFromImage(sitk.ReadImage(str(ceph_dir / "images" / "151.jpg")))
    ceph = ceph[..., 0] if ceph.ndim == 3 else ceph
    ceph = ceph[::4, ::4]  # 600 x 484 (rows x columns), 0.4 mm
    vol = np.zeros((ceph.shape[0], ceph.shape[1], 3), np.uint8)  # K (z), J (y), I (x)
    vol[:, :, 1] = ceph  # i = 1: image x = j (columns), image y = k (rows)
    itk = sitk.GetImageFromArray(vol)
    itk.SetSpacing((1.5, 0.4, 0.4))
    path = tmp_path / "vol.nrrd"
    sitk.WriteImage(itk, str(path))
    assert main(["detect", str(path), "-o", str(tmp_path / "out"), "-q", "--axis", "0", "--slice", "1",
                 "--format", "mrk.json"]) == 0
    doc = read_markups(tmp_path / "out" / "vol.mrk.json")
    assert np.allclose(doc["lps"][:, 0], 1.5)  # every point on the plane i = 1
    truth = {c.case_id: c.xy for c in read_landmark_csv(ceph_dir / "test1_senior.csv")}["151"]
    found = np.c_[doc["lps"][:, 1], doc["lps"][:, 2]] / 0.4 * 4  # back to the JPEG's pixels
    assert np.median(np.linalg.norm(found - truth, axis=1)) * 0.1 < 3.0  # mm


def test_evaluate_second_csv_scores_against_the_mean_of_both(ceph_dir, tmp_path):
    out = tmp_path / "e.json"
    assert main(["evaluate", str(ceph_dir / "test1_senior.csv"), "--second-csv",
                 str(ceph_dir / "test1_junior.csv"), "--limit", "1", "--json", str(out), "--model",
                 "ceph-isbi2015"]) == 0
    errors = np.array(json.loads(out.read_text())["errors_mm"])[0]
    case = read_landmark_csv(ceph_dir / "test1_senior.csv")[0]
    junior = {c.case_id: c.xy for c in read_landmark_csv(ceph_dir / "test1_junior.csv")}[case.case_id]
    pred = Detector.load("ceph-isbi2015").detect(read_image(case.image, spacing=0.1)).xy
    want = np.linalg.norm(pred - (case.xy + junior) / 2, axis=1) * 0.1
    assert not np.allclose(errors, np.linalg.norm(pred - case.xy, axis=1) * 0.1, atol=1e-2)  # not the senior alone
    assert np.allclose(errors, want, atol=1e-3)


def test_evaluate_hand_uses_the_50_mm_wrist_width(hand_dir, tmp_path):
    out = tmp_path / "h.json"
    assert main(["evaluate", str(hand_dir / "landmarks.csv"), "--hand", "--split", "valid", "--limit", "1",
                 "--json", str(out), "--model", "hand-dha"]) == 0
    res = json.loads(out.read_text())
    case = [c for c in read_landmark_csv(hand_dir / "landmarks.csv") if c.split == "valid"][0]
    pred = Detector.load("hand-dha").detect(read_image(case.image)).xy
    mm_per_px = 50.0 / np.linalg.norm(case.xy[1] - case.xy[5])  # landmarks 2 and 6, 50 mm apart
    assert np.allclose(res["errors_mm"][0], np.linalg.norm(pred - case.xy, axis=1) * mm_per_px, atol=1e-3)
    assert "sdr_10mm" in res["overall"]  # the hand radii 2/4/10 mm


def test_no_flip_turns_an_official_checkpoints_flip_test_off(tmp_path):
    import argparse

    from MedSapiensLandmarksLib.cli import load_detector
    from official_fixtures import head_state, pretrain_state, save_mmengine

    full = {f"backbone.{k}": v for k, v in pretrain_state(seed=3).items() if k != "cls_token"}
    save_mmengine(tmp_path / "full.pth", {**full, **head_state(19, seed=4)}, 19)
    args = dict(model=str(tmp_path / "full.pth"), device="cpu", threads=None, backend=None, anatomy=None,
                pretrain=None, flip=False)
    assert load_detector(argparse.Namespace(**args, no_flip=False)).card["coarse"]["input"]["flip_test"] is True
    assert load_detector(argparse.Namespace(**args, no_flip=True)).card["coarse"]["input"]["flip_test"] is False


@pytest.mark.parametrize("spacing", ["nan", "1e308", "0", "-0.1"])
def test_a_spacing_no_radiograph_has_is_refused_in_one_line(ceph_dir, tmp_path, capsys, spacing):
    assert main(["detect", str(ceph_dir / "images" / "151.jpg"), "-o", str(tmp_path), "--spacing", spacing,
                 "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "outside 0.01-10 mm per pixel" in err[0]
    assert not list(tmp_path.glob("*.mrk.json"))
