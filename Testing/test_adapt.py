"""`adapt`: a site's convention learned from its corrected cases, without training."""
import csv
import json

import numpy as np
import pytest

from MedSapiensLandmarksLib.adaptation import basis, leave_one_out
from MedSapiensLandmarksLib.cli import main
from MedSapiensLandmarksLib.detector import Detector
from MedSapiensLandmarksLib.imageio import read_image

BASE = "ceph-isbi2015"
SHIFT = {15: (0.05, 0.0), 5: (0.0, 0.03)}  # Pog' along S->N, B across it (units of |S-N|)


@pytest.fixture(scope="module")
def site(ceph_dir, tmp_path_factory):
    """Three corrected cases of a site that puts Pog' and B elsewhere than the model does, and
    their images; the model's own detections stand in for everything else."""
    folder = tmp_path_factory.mktemp("site")
    det = Detector.load(BASE)
    rows = [["image_path"] + [f"{i}_{a}" for i in range(1, 20) for a in ("x", "y")]]
    for case in ("141", "142", "143"):
        (folder / f"{case}.jpg").symlink_to(ceph_dir / "images" / f"{case}.jpg")
        xy = det.detect(read_image(folder / f"{case}.jpg", spacing=0.1)).xy
        b = basis(xy, (0.1, 0.1), det.names, "sn")
        for k, shift in SHIFT.items():
            xy[k] += b @ shift
        rows.append([f"{case}.jpg", *(f"{v:.4f}" for v in xy.ravel())])
    with open(folder / "cases.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return folder, det


def adapt(folder, out, *extra):
    return main(["adapt", "--csv", str(folder / "cases.csv"), "--images", str(folder), "--spacing", "0.1",
                 "--model", BASE, "-o", str(out), *extra])


def test_adapt_learns_the_sites_offsets_and_detect_applies_them(site, ceph_dir, tmp_path, capsys):
    folder, base = site
    assert adapt(folder, tmp_path / "adapted") == 0
    assert "adapted ceph-isbi2015 to 3 cases of this site (frame sn, shrink 0.5)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "adapted").iterdir()) == ["model.json"]  # no graphs copied
    card = json.loads((tmp_path / "adapted" / "model.json").read_text())
    assert card["base"] == BASE and card["site_layer"]["cases"] == ["141", "142", "143"]
    offsets = np.array(card["site_layer"]["offsets"])
    want = np.zeros((19, 2))
    for k, shift in SHIFT.items():
        want[k] = np.array(shift) * 3 / 3.5  # three cases, shrunk by half a case
    assert np.abs(offsets - want).max() < 2e-4  # the 4-decimal CSV
    # a new image of the site: each point moved by the offsets in that image's own S-N frame
    image = read_image(ceph_dir / "images" / "144.jpg", spacing=0.1)
    before = base.detect(image).xy
    adapted = Detector.load(tmp_path / "adapted").detect(image)
    expected = before + want @ basis(before, (0.1, 0.1), base.names, "sn").T
    assert np.abs(adapted.xy - expected).max() < 0.05  # px
    moved = np.linalg.norm(adapted.xy - before, axis=1) * 0.1
    assert moved[15] > 2.0 and moved[5] > 1.0 and np.delete(moved, [5, 15]).max() < 0.01  # mm
    assert adapted.meta["site_layer"] == {"cases": 3, "frame": "sn", "withheld": False}
    # refitting an adapted model starts from its base, never stacks layers
    assert main(["adapt", "--csv", str(folder / "cases.csv"), "--images", str(folder), "--spacing", "0.1",
                 "--model", str(tmp_path / "adapted"), "-o", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "model.json").read_text())
    assert again["base"] == BASE and np.allclose(again["site_layer"]["offsets"], offsets)


def test_bad_cases_get_one_clear_error_or_a_warning_and_no_half_written_model(site, tmp_path, capsys):
    folder, _ = site
    rows = list(csv.reader(open(folder / "cases.csv")))
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.glob("*.jpg"):
        (bad / f.name).symlink_to(f.resolve())
    (bad / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    missing = list(rows[2])
    missing[1 + 2 * 15:1 + 2 * 15 + 2] = ["", ""]  # Pog' marked missing in case 142
    with open(bad / "cases.csv", "w", newline="") as f:
        csv.writer(f).writerows([rows[0], rows[1], missing, rows[3], ["broken.jpg"] + rows[3][1:]])
    assert adapt(bad, tmp_path / "out") == 0
    captured = capsys.readouterr()
    assert captured.err.strip().startswith("warning: case broken left out:") and "truncated JPEG" in captured.err
    layer = json.loads((tmp_path / "out" / "model.json").read_text())["site_layer"]
    assert layer["cases"] == ["141", "142", "143"] and layer["counts"][15] == 2 and layer["counts"][0] == 3
    # another landmark set: one error, nothing written
    with open(bad / "cases.csv", "w", newline="") as f:
        csv.writer(f).writerows([rows[0][:7], [r[0] for r in rows[1:2]] + rows[1][1:7]])
    assert adapt(bad, tmp_path / "three") == 2
    assert "has 3 landmarks, the model 19" in capsys.readouterr().err and not (tmp_path / "three").exists()
    with open(bad / "cases.csv", "w", newline="") as f:
        csv.writer(f).writerows([rows[0]])
    assert adapt(bad, tmp_path / "none") == 2
    assert "no corrected cases" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_each_case_is_scored_with_the_layer_of_the_other_cases():
    names = ["A", "B"]
    preds = [np.array([[10.0, 10.0], [20.0, 20.0]]) + i for i in range(3)]
    shift = np.array([[5.0, 0.0], [0.0, -2.0]])  # pixels: the site's convention
    truths = [p + shift for p in preds]
    truths[2][1] = np.nan  # marked missing
    sp = [(0.1, 0.1)] * 3
    # no shrinkage: every other case shows the same shift, so each case is put right
    err = leave_one_out(preds, truths, sp, names, "mm", 0.0)
    assert np.allclose(err[:, 0], 0.0) and np.allclose(err[:2, 1], 0.0) and np.isnan(err[2, 1])
    # shrinkage 0.5: two other cases move a point 2 / 2.5 of the way; B of cases 0 and 1 has
    # one other case with B (case 2's is missing): 1 / 1.5 of the way
    err = leave_one_out(preds, truths, sp, names, "mm", 0.5)
    assert np.allclose(err[:, 0], 0.5 * 0.2) and np.allclose(err[:2, 1], 0.2 / 3)
    # one case alone is scored unadapted
    assert np.allclose(leave_one_out(preds[:1], truths[:1], sp[:1], names, "mm", 0.5), [[0.5, 0.2]])


def test_a_layer_that_does_not_help_the_sites_own_cases_is_withheld():
    from MedSapiensLandmarksLib.adaptation import apply_layer
    from MedSapiensLandmarksLib.site_model import SiteCases, adapt_cases

    names = [f"P{k}" for k in range(19)]
    rng = np.random.default_rng(1)
    truths = [rng.uniform(100, 900, (19, 2)) for _ in range(5)]
    sp = (0.1, 0.1)

    def site(convention_mm, noise_mm, n=5):
        found = SiteCases()
        for i, t in enumerate(truths[:n]):
            pred = t + rng.normal(0, noise_mm / 0.1, t.shape)
            pred[4, 0] -= convention_mm / 0.1  # the site puts P4 this far right of the model
            found.add(str(i), pred, t, sp, None)
        return found, adapt_cases(found, names, None, "mm").layer

    # the same rule by hand: each case's error with the layer of the others against its own
    found, noise = site(0.0, 1.5)
    loo = leave_one_out(found.preds, found.truths, found.spacings, names, "mm", 0.5)
    own = np.stack([np.linalg.norm((p - t) * 0.1, axis=1) for p, t in zip(found.preds, found.truths)])
    assert loo.mean() > own.mean() and noise.withheld  # offsets of noise only add noise
    assert np.abs(noise.offsets).max() > 0.1  # still fitted and kept (a later Export may apply it)
    x = rng.uniform(100, 900, (19, 2))
    assert np.array_equal(apply_layer(x, sp, names, noise), x)
    found, conv = site(3.0, 0.3)
    assert not conv.withheld
    assert apply_layer(x, sp, names, conv)[4, 0] - x[4, 0] == pytest.approx(30 * 5 / 5.5, abs=2.0)  # px
    assert not site(0.0, 1.5, n=1)[1].withheld  # one case cannot judge itself
    from MedSapiensLandmarksLib.adaptation import SiteLayer

    assert SiteLayer.from_json(noise.to_json()).withheld and not SiteLayer.from_json(conv.to_json()).withheld


def test_adapt_says_when_the_sites_cases_agree_with_the_model(ceph_dir, tmp_path, capsys):
    det = Detector.load(BASE)
    rng = np.random.default_rng(2)
    rows = [["image_path"] + [f"{i}_{a}" for i in range(1, 20) for a in ("x", "y")]]
    for case in ("141", "142", "143"):
        (tmp_path / f"{case}.jpg").symlink_to(ceph_dir / "images" / f"{case}.jpg")
        xy = det.detect(read_image(tmp_path / f"{case}.jpg", spacing=0.1)).xy + rng.normal(0, 10.0, (19, 2))
        rows.append([f"{case}.jpg", *(f"{v:.4f}" for v in xy.ravel())])
    with open(tmp_path / "cases.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    assert adapt(tmp_path, tmp_path / "adapted") == 0
    assert "(withheld: the corrections do not repeat from case to case" in capsys.readouterr().out
    card = json.loads((tmp_path / "adapted" / "model.json").read_text())
    assert card["site_layer"]["withheld"] is True
    image = read_image(ceph_dir / "images" / "144.jpg", spacing=0.1)
    adapted = Detector.load(tmp_path / "adapted").detect(image)
    assert np.array_equal(adapted.xy, det.detect(image).xy) and adapted.meta["site_layer"]["withheld"]


def test_a_site_with_wider_errors_gets_lower_confidence_and_one_within_them_the_base_calibration():
    from MedSapiensLandmarksLib.calibration import apply
    from MedSapiensLandmarksLib.site_model import SiteCases, adapt_cases

    names = [f"P{k}" for k in range(19)]
    cal = {"a": 1.0, "b": 0.0, "radius_mm": 2.0, "tail_dof": 3.0}
    rng = np.random.default_rng(0)
    truths = [rng.uniform(100, 900, (19, 2)) for _ in range(5)]
    raw = np.full(19, 0.9)  # P(within 2 mm) = 0.9 by the base calibration

    def site(noise_mm):
        found = SiteCases()
        for i, t in enumerate(truths):
            found.add(str(i), t + rng.normal(0, noise_mm / 0.1, t.shape), t, (0.1, 0.1), raw)
        return adapt_cases(found, names, cal, "mm")

    wide = site(4.0)  # about 5 mm off on average: far more than 10 % beyond 2 mm
    assert wide.calibration["site_scale"] > 2.0 and wide.calibration["site_points"] == 95
    assert apply(wide.calibration, raw).max() < 0.5 and "widened x" in wide.confidence_note()
    close = site(0.05)  # the site agrees with the model: never surer than validation said
    assert close.calibration["site_scale"] == 1.0 and "not widened" in close.confidence_note()
    assert np.allclose(apply(close.calibration, raw), 0.9)
    # no raw confidence recorded (an older export): the base calibration, said so
    found = SiteCases()
    found.add("0", truths[0], truths[0], (0.1, 0.1), None)
    assert adapt_cases(found, names, cal, "mm").calibration is None
