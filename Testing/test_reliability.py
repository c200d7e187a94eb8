"""Reliability campaign: broken inputs, hostile or mismatched checkpoints, a crashing reader."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import reliability_corpus
from conftest import ROOT
from MedSapiensLandmarksLib import batch
from MedSapiensLandmarksLib.detector import Detector
from MedSapiensLandmarksLib.errors import CheckpointError
from MedSapiensLandmarksLib.cli import main
from MedSapiensLandmarksLib.imageio import read_image
from MedSapiensLandmarksLib.markups import read_markups

HAND = ROOT / "MedSapiensLandmarks" / "Resources" / "Models" / "hand-dha"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, ceph_dir):
    folder = tmp_path_factory.mktemp("corpus")
    return reliability_corpus.build(folder / "in", ceph_dir / "images" / "151.jpg")


def test_every_bad_input_gets_one_error_and_the_rest_is_processed(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["detect", *[str(p) for _, p in corpus], "-o", str(out), "--workers", "1"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2
    for entry, path in corpus:
        stem = path.name[: -len(path.suffix)]
        said = [line for line in err if line.startswith(f"error: {path}:")]
        written = sorted(p.name for p in out.iterdir() if p.name.startswith(stem + "."))
        if entry.expect.startswith("ok"):
            assert not said, said
            assert written == [f"{stem}.mrk.json", f"{stem}.overlay.png"], entry.name
            assert read_markups(out / f"{stem}.mrk.json")["lps"].shape == (19, 3)
        else:
            assert len(said) == 1 and entry.expect in said[0], (entry.name, said)
            if entry.expect != "same output name":  # (that one's names hold the first file's results)
                assert written == [], entry.name
    warned = [line for line in err if line.startswith("warning:")]
    assert any("no-spacing.dcm" in w and "no pixel spacing" in w for w in warned)
    assert not any("spacing.dcm" in w and "no-spacing" not in w and "pixel spacing" in w for w in warned)
    # the synthetic test pictures are no cephalograms: the plausibility check says so
    rgb = next(path for entry, path in corpus if entry.name == "rgb.png")
    assert any(w.startswith(f"warning: {rgb}: does not look like a lateral cephalogram") for w in warned)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_dicom_spacing_tags_are_used(corpus):
    paths = {entry.name: path for entry, path in corpus}
    pixel = read_image(paths["spacing.dcm"])
    assert pixel.spacing == pytest.approx((0.25, 0.2))  # row\col order
    assert pixel.spacing_source == "DICOM Pixel Spacing (0028,0030)"
    imager = read_image(paths["imager-spacing.dcm"])  # detector plane / magnification 1.1
    assert imager.spacing == pytest.approx((0.15 / 1.1, 0.15 / 1.1)) and imager.spacing_known
    assert imager.spacing_source == ("DICOM Imager Pixel Spacing (0018,1164) / Estimated Radiographic "
                                     "Magnification Factor 1.1 (0018,1114)")
    none = read_image(paths["no-spacing.dcm"])
    assert not none.spacing_known and none.spacing_source.startswith("none in the DICOM file")


def header_refusal(path):
    """read_image(path) in a fresh interpreter (this process's high-water mark already holds
    earlier tests' nets): its error message and how much its peak memory grew."""
    code = textwrap.dedent("""
        import json, resource, sys
        from MedSapiensLandmarksLib.imageio import read_image
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            read_image(sys.argv[1])
            message = ""
        except ValueError as err:
            message = str(err)
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        print(json.dumps({"message": message, "grown_mb": grown}))
    """)
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                         cwd=ROOT / "MedSapiensLandmarks")
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_huge_image_is_refused_from_its_header(corpus):
    out = header_refusal(dict((e.name, p) for e, p in corpus)["huge.png"])
    assert "20000x20000 pixels is larger than the supported" in out["message"]
    assert out["grown_mb"] < 100  # 400 Mpixel (1.2 GB as RGB) never decoded


def test_a_small_file_claiming_a_billion_voxels_is_refused_before_decoding(tmp_path):
    """A 1 kB gzip NRRD of 2000x2000x250 (each slice within the per-slice cap): 1e9 voxels
    took a worker to 3 GB before the whole-file cap was checked from the header."""
    import gzip

    path = tmp_path / "bomb.nrrd"
    path.write_bytes(b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2000 2000 250\nencoding: gzip\n\n"
                     + gzip.compress(bytes(2**20)))
    out = header_refusal(path)
    assert "2000x2000x250 voxels (1,000,000,000 values) is larger than the supported" in out["message"]
    assert out["grown_mb"] < 100


def test_3d_volume_detects_on_the_chosen_slice(corpus, tmp_path):
    path = dict((e.name, p) for e, p in corpus)["volume.nrrd"]
    assert main(["detect", str(path), "-o", str(tmp_path), "--slice", "2", "-q"]) == 0
    lps = read_markups(tmp_path / "volume.mrk.json")["lps"]
    assert lps.shape == (19, 3) and np.allclose(lps[:, 2], 4.0)  # slice 2 x 2.0 mm


@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_unusable_output_folder_is_one_error_and_nothing_runs(tmp_path, ceph_dir, capsys, kind):
    if kind == "file":
        out = tmp_path / "out.txt"
        out.write_text("keep me")
    elif os.geteuid() != 0:
        out = tmp_path / "ro"
        out.mkdir()
        out.chmod(0o500)
    else:  # root ignores permission bits; /proc refuses new entries for everyone
        out = Path("/proc/medsapiens-out")
    rc = main(["detect", str(ceph_dir / "images" / "151.jpg"), "-o", str(out)])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and str(out) in lines[0]
    assert ("not a folder" if kind == "file" else "cannot be written") in lines[0]
    if kind == "file":
        assert out.read_text() == "keep me"


def test_skip_existing_resumes_only_missing_cases(tmp_path, ceph_dir, capsys):
    images = [str(ceph_dir / "images" / f"{n}.jpg") for n in (151, 152)]
    out = tmp_path / "out"
    assert main(["detect", images[0], "-o", str(out), "--spacing", "0.1", "-q"]) == 0
    first = (out / "151.mrk.json").stat().st_mtime_ns
    assert main(["detect", *images, "-o", str(out), "--spacing", "0.1", "--skip-existing"]) == 0
    assert "skipping 1 image(s)" in capsys.readouterr().err
    assert (out / "151.mrk.json").stat().st_mtime_ns == first and (out / "152.mrk.json").exists()


def _crash_on_poison(path, **kwargs):
    if "poison" in str(path):
        os._exit(3)  # a decoder dying in native code
    return read_image(path, **kwargs)


def test_a_crashing_reader_costs_only_its_own_file(tmp_path, ceph_dir, monkeypatch):
    monkeypatch.setattr(batch, "read_image", _crash_on_poison)
    src = ceph_dir / "images" / "151.jpg"
    paths = []
    for name in ("a.jpg", "poison.jpg", "b.jpg", "c.jpg"):
        shutil.copy(src, tmp_path / name)
        paths.append(tmp_path / name)
    items = list(batch.stream_images(paths, workers=1, spacing=0.1))
    assert [i.path.name for i in items] == ["a.jpg", "poison.jpg", "b.jpg", "c.jpg"]
    assert [i.error is None for i in items] == [True, False, True, True]
    assert "reader crashed" in items[1].error and items[2].image.shape == (2400, 1935)


# -- checkpoints ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_hand():
    """The shipped hand model: ONNX graphs + card (format 2, as every shipped model)."""
    from MedSapiensLandmarksLib.cards import CARD_FORMAT_ONNX

    assert json.loads((HAND / "model.json").read_text())["format"] == CARD_FORMAT_ONNX
    return HAND


@pytest.fixture
def hand_copy(onnx_hand, tmp_path):
    return shutil.copytree(onnx_hand, tmp_path / "hand")


def _edit_card(folder, change):
    card = json.loads((folder / "model.json").read_text())
    change(card)
    (folder / "model.json").write_text(json.dumps(card))


def test_truncated_graph_is_refused(hand_copy):
    g = hand_copy / "coarse.onnx"
    g.write_bytes(g.read_bytes()[: g.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="coarse.onnx: not a readable ONNX graph"):
        Detector.load(hand_copy)
    with pytest.raises(CheckpointError, match="coarse.onnx: not a readable ONNX file"):
        Detector.load(hand_copy, backend="torch")


def test_card_with_fewer_landmarks_than_the_weights_is_refused(hand_copy):
    _edit_card(hand_copy, lambda c: c["landmarks"].pop())
    with pytest.raises(CheckpointError, match="the coarse graph predicts 37 landmarks but the model card names 36"):
        Detector.load(hand_copy)
    with pytest.raises(CheckpointError, match="the coarse weights predict 37 landmarks but the model card names 36"):
        Detector.load(hand_copy, backend="torch")


def test_card_framing_another_input_size_is_refused(hand_copy):
    h, w = json.loads((hand_copy / "model.json").read_text())["refine"]["input"]["size"]
    _edit_card(hand_copy, lambda c: c["refine"]["input"].update(size=[h + 32, w + 32]))
    with pytest.raises(CheckpointError, match=rf"the refine graph takes 1x{h}x{w} inputs, the card frames "
                                              rf"1x{h + 32}x{w + 32}"):
        Detector.load(hand_copy)


def test_card_describing_another_network_names_the_mismatch(hand_copy):
    _edit_card(hand_copy, lambda c: c["coarse"]["net"].update(encoder="resnet34"))
    with pytest.raises(CheckpointError, match="weights do not match the model; missing keys"):
        Detector.load(hand_copy, backend="torch")
    _edit_card(hand_copy, lambda c: c["coarse"]["net"].update(encoder="no-such-encoder"))
    with pytest.raises(CheckpointError, match="cannot build the coarse net"):
        Detector.load(hand_copy, backend="torch")


def test_missing_graph_is_named(hand_copy):
    (hand_copy / "refine.onnx").unlink()
    with pytest.raises(CheckpointError, match="refine.onnx: ONNX graph named by the model card is missing"):
        Detector.load(hand_copy)


def test_card_that_is_not_json_is_refused(hand_copy):
    (hand_copy / "model.json").write_text("{ half a card")
    with pytest.raises(CheckpointError, match="not a readable model card"):
        Detector.load(hand_copy)


def test_shards_split_the_sorted_inputs_without_overlap(monkeypatch):
    from MedSapiensLandmarksLib.cli import UsageError, shard

    files = [Path(f"/x/{i:03d}.png") for i in range(10)][::-1]
    parts = [shard(files, f"{k}/3") for k in range(3)]
    assert sorted(p for part in parts for p in part) == sorted(files)
    assert parts[0] == [Path("/x/000.png"), Path("/x/003.png"), Path("/x/006.png"), Path("/x/009.png")]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert shard(files, "env") == parts[1]
    for bad in ("3/3", "a/b", "1"):
        with pytest.raises(UsageError):
            shard(files, bad)
