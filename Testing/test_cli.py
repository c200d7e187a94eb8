"""The command line on real cephalograms with the shipped default model."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from MedSapiensLandmarksLib.analysis import MEASUREMENTS, measure
from MedSapiensLandmarksLib.cli import main
from MedSapiensLandmarksLib.datasets import read_landmark_csv
from MedSapiensLandmarksLib.markups import read_markups
from MedSapiensLandmarksLib.overlay import COLOURS, GRAYS, confidence_colour
from slicer_helpers import read_markups_with_slicer


@pytest.fixture(scope="module")
def truth_151(ceph_dir):
    cases = {c.case_id: c for c in read_landmark_csv(ceph_dir / "test1_senior.csv", spacing=0.1)}
    return cases["151"].xy


def test_detect_writes_markups_and_overlay_near_the_annotation(tmp_path, ceph_dir, truth_151):
    # the protocol model (trained on 001-140): ceph-default has seen the test1 images
    rc = main(["detect", str(ceph_dir / "images" / "151.jpg"), "--spacing", "0.1", "-o", str(tmp_path),
               "--format", "mrk.json,fcsv,csv,png,analysis", "--model", "ceph-isbi2015"])
    assert rc == 0
    doc = read_markups(tmp_path / "151.mrk.json")
    assert doc["labels"][:3] == ["S", "N", "Or"] and len(doc["labels"]) == 19
    # LPS mm at 0.1 mm/pixel, origin 0: pixel = position / 0.1
    xy = doc["lps"][:, :2] / 0.1
    err_mm = np.linalg.norm(xy - truth_151, axis=1) * 0.1
    # a sanity check on one image (accuracy is measured by `evaluate` over test1: 5 mm holds for
    # 94 % of points there; on 151, Po, ANS and Ar are 5-6.4 mm off with the shipped model)
    assert np.median(err_mm) < 2.0 and (err_mm < 5.0).mean() >= 0.8, err_mm.round(2)
    labels, ras, _ = read_markups_with_slicer(tmp_path / "151.mrk.json")
    assert np.abs(ras - doc["lps"] * [-1, -1, 1]).max() < 1e-3
    conf = np.array(doc["extra"]["confidence"])
    assert conf.shape == (19,) and ((conf > 0) & (conf <= 1)).all()
    with Image.open(tmp_path / "151.overlay.png") as pic:
        assert pic.mode == "P" and pic.size[1] == 2000 and abs(pic.size[0] - 1612) <= 1
        rgb = np.asarray(pic.convert("RGB")).astype(int)
    # each ring is drawn around its landmark (scaled 2000/2400) in its confidence colour
    for k in (0, 9):
        cx, cy = (xy[k] + 0.5) * 2000 / 2400 - 0.5
        box = rgb[int(cy) - 15:int(cy) + 16, int(cx) - 15:int(cx) + 16]
        want = COLOURS[confidence_colour(conf[k]) - GRAYS]
        assert (box == want).all(-1).sum() > 20, k
    assert (tmp_path / "151.fcsv").exists() and len((tmp_path / "151.csv").read_text().splitlines()) == 20
    rows = list(csv.DictReader(open(tmp_path / "151.analysis.csv")))
    assert [r["measurement"] for r in rows] == list(MEASUREMENTS)
    truth = measure(truth_151, 0.1)  # the same measurements on the annotation
    got = {r["measurement"]: float(r["value"]) for r in rows}
    assert abs(got["SNA"] - truth["SNA"]) < 2.0 and abs(got["FHI"] - truth["FHI"]) < 0.03


def test_batch_with_bad_files_keeps_going(tmp_path, ceph_dir, capsys):
    bad = tmp_path / "in"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    (bad / "notes.png").write_text("not an image")
    out = tmp_path / "out"
    rc = main(["detect", str(bad / "empty.png"), str(ceph_dir / "images" / "152.jpg"),
               str(bad / "notes.png"), str(bad / "missing.jpg"), "--spacing", "0.1", "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 3
    assert any("empty.png: empty file" in e for e in errors)
    assert any("notes.png: not a readable image" in e for e in errors)
    assert any("missing.jpg: file not found" in e for e in errors)
    assert sorted(p.name for p in out.iterdir()) == ["152.mrk.json", "152.overlay.png"]


def test_wrong_checkpoint_and_bad_format_exit_2(tmp_path, ceph_dir, capsys):
    junk = tmp_path / "model.pth"
    junk.write_bytes(b"\x00" * 100)
    img = str(ceph_dir / "images" / "151.jpg")
    assert main(["detect", img, "-o", str(tmp_path / "o"), "--model", str(junk)]) == 2
    assert main(["detect", img, "-o", str(tmp_path / "o"), "--model", str(tmp_path / "nope")]) == 2
    assert main(["detect", img, "-o", str(tmp_path / "o"), "--format", "mrk.json,docx"]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "refused or unreadable checkpoint" in lines[0]
    assert "model not found" in lines[1] and "unknown output format(s) docx" in lines[2]


def test_evaluate_prints_mre_and_sdr(tmp_path, ceph_dir, truth_151):
    out = tmp_path / "e.json"
    proc = subprocess.run([sys.executable, "-m", "MedSapiensLandmarksLib.cli", "evaluate",
                           str(ceph_dir / "test1_senior.csv"), "--limit", "2", "--json", str(out),
                           "--model", "ceph-isbi2015",  # unseen images: not ceph-default's training set
                           "--report", str(tmp_path / "report")],
                          capture_output=True, text=True, cwd=ROOT / "MedSapiensLandmarks", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ALL" in proc.stdout and "<2mm" in proc.stdout
    res = json.loads(out.read_text())
    errors = np.array(res["errors_mm"])
    assert errors.shape == (2, 19)
    assert res["overall"]["mre_mm"] == pytest.approx(errors.mean(), abs=1e-4)  # errors stored to 1e-4
    assert res["overall"]["sdr_2mm"] == pytest.approx((errors < 2).mean() * 100)
    assert res["overall"]["mre_mm"] < 3.0
    assert set(res["classification"]) >= {"ANB", "SNB", "SNA", "ODI", "APDI", "FHI", "FMA", "MW"}
    assert "Spearman(conf, error)" in proc.stdout and "classification agreement" in proc.stdout
    report = (tmp_path / "report" / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    assert sum(r.split(" | ")[0][2:] in ("S", "N", "Ar", "**all**") for r in rows) == 4
    worst = sorted(p.name for p in (tmp_path / "report").glob("worst-*.png"))
    assert len(worst) == 2 and all(f"]({name})" in report for name in worst)
    first = errors.mean(1).argmax()  # worst case first, named by its case id
    assert worst[0] == f"worst-1-{res['cases'][first]}.png"
    for name in ("error_histogram.png", "landmark_boxplot.png"):
        with Image.open(tmp_path / "report" / name) as pic:
            assert pic.size[0] > 300 and f"({name})" in report


def test_train_ids_select_documented_cases(tmp_path, ceph_dir, capsys):
    csv_path = str(ceph_dir / "train_senior.csv")
    assert main(["train", "--csv", csv_path, "--ids", "001,999", "-o", str(tmp_path / "m")]) == 2
    assert "--ids: no case 999" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()  # refused before anything is written


def test_train_passes_the_learning_rate_and_case_split_to_fit(tmp_path, ceph_dir, monkeypatch):
    from MedSapiensLandmarksLib import training

    seen = {}

    def fake_fit(cases, val, names, out, cfg, card=None, init=None, reframe=()):
        seen.update(train=[c.case_id for c in cases], val=[c.case_id for c in val], lr=cfg.lr)
        return out / "model.json"

    monkeypatch.setattr(training, "fit", fake_fit)
    csv_path = str(ceph_dir / "train_senior.csv")
    args = ["train", "--csv", csv_path, "--ids", "003,001,002", "--val-count", "1", "-o", str(tmp_path)]
    assert main(args + ["--lr", "3e-4"]) == 0
    assert seen == {"train": ["001", "002"], "val": ["003"], "lr": 3e-4}
    assert main(args) == 0 and seen["lr"] == training.TrainConfig().lr == 1e-3
    seen.clear()
    assert main(args + ["--recipe", "v3", "--reframe", "refine"]) == 2  # nothing to reframe
    assert seen == {}


def test_measurements_table_and_report_pdf(tmp_path, ceph_dir, capsys, hand_dir):
    import pypdfium2

    from MedSapiensLandmarksLib.cephalometry import MEASUREMENTS as ANALYSES
    from MedSapiensLandmarksLib.cephalometry import measure_all

    images = [str(ceph_dir / "images" / f"{i}.jpg") for i in (151, 152)]
    assert main(["detect", *images, "--spacing", "0.1", "-o", str(tmp_path), "-q",
                 "--format", "mrk.json,measurements,report"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "measurements.csv")))
    assert [r["image"] for r in rows] == ["151", "152"]
    for row in rows:  # the values are the analyses of the written points
        xy = read_markups(tmp_path / f"{row['image']}.mrk.json")["lps"][:, :2] / 0.1
        want = measure_all(xy, (0.1, 0.1))
        for m in ANALYSES:
            assert float(row[m.key]) == pytest.approx(float(want[m.key]), rel=1e-3, abs=1e-3), m.key
            assert float(row[f"{m.key} low"]) < float(row[f"{m.key} high"])
        assert row["plausible"] == "1"
    # a later run into the same folder adds its image to the cohort table
    assert main(["detect", str(ceph_dir / "images" / "153.jpg"), "--spacing", "0.1", "-o", str(tmp_path),
                 "-q", "--format", "measurements"]) == 0
    assert [r["image"] for r in csv.DictReader(open(tmp_path / "measurements.csv"))] == ["151", "152", "153"]
    pdf = pypdfium2.PdfDocument(str(tmp_path / "151.report.pdf"))
    assert len(pdf) == 1
    page = pdf[0].render(scale=1.0).to_pil().convert("L")
    assert page.size == (596, 842)  # A4 at 72 dpi
    pixels = np.asarray(page)
    assert (pixels < 128).mean() > 0.05  # the radiograph and the tables are drawn
    text = pdf[0].get_textpage().get_text_range()
    assert all(a in text for a in ("Steiner", "Downs", "Bjork-Jarabak", "Ricketts", "Legan-Burstone"))
    # analyses need the 19 cephalometric landmarks
    capsys.readouterr()
    hand = hand_dir / "images" / "3143.jpg"
    assert main(["detect", str(hand), "--model", "hand-default", "-o", str(tmp_path / "h"),
                 "--format", "measurements"]) == 2
    assert "measurements output needs a model of the 19 ISBI" in capsys.readouterr().err


def test_calibrate_refits_the_shipped_card_from_its_validation_cases(tmp_path, ceph_dir):
    import shutil

    shipped = ROOT / "MedSapiensLandmarks" / "Resources" / "Models" / "ceph-isbi2015"
    model = tmp_path / "ceph"
    shutil.copytree(shipped, model)
    card = json.loads((model / "model.json").read_text())
    want = {k: card.pop(k) for k in ("calibration", "shape")}
    want_mirror = card["coarse"]["input"].pop("mirror_check_below")
    (model / "model.json").write_text(json.dumps(card))
    train = str(ceph_dir / "train_senior.csv")
    ids = ",".join(str(i) for i in range(141, 151))
    assert main(["calibrate", train, "--model", str(model), "--ids", ids, "--train-csv", train]) == 0
    got = json.loads((model / "model.json").read_text())
    # the shipped card was fitted by this command on validation 141-150 and training 001-140
    for key in ("a", "b", "tail_dof", "validation_ece"):
        assert got["calibration"][key] == pytest.approx(want["calibration"][key], rel=1e-3), key
    assert sorted(got["calibration"]["cases"]) == [f"{i:03d}" for i in range(141, 151)]
    assert got["coarse"]["input"]["mirror_check_below"] == pytest.approx(want_mirror, rel=1e-3)
    for key in ("shape_score", "mean_confidence", "validation_max_score"):
        assert got["shape"]["thresholds"][key] == pytest.approx(want["shape"]["thresholds"][key], rel=1e-3), key
