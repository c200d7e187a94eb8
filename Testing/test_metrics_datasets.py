import numpy as np
import pytest

from MedSapiensLandmarksLib.datasets import read_landmark_csv
from MedSapiensLandmarksLib.metrics import hand_scale, radial_errors, summarize


def test_mre_and_sdr_on_known_errors():
    pred = np.array([[[0.0, 0.0], [3.0, 4.0], [0.0, 25.0]]])
    truth = np.zeros((1, 3, 2))
    e = radial_errors(pred, truth, 0.1)  # 0, 0.5, 2.5 mm
    assert np.allclose(e, [[0.0, 0.5, 2.5]])
    s = summarize(e)
    assert s["mre_mm"] == pytest.approx(1.0)
    assert s["sdr_2mm"] == pytest.approx(200 / 3) and s["sdr_2.5mm"] == pytest.approx(200 / 3)
    assert s["sdr_3mm"] == pytest.approx(100.0)


def test_hand_scale_makes_wrist_width_50mm():
    truth = np.zeros((2, 6, 2))
    truth[0, 5] = [100, 0]
    truth[1, 5] = [0, 250]
    truth[:, 1] = 0
    assert np.allclose(hand_scale(truth), [0.5, 0.2])


def test_isbi_and_hand_csv_layouts(ceph_dir, hand_dir):
    cases = read_landmark_csv(ceph_dir / "test1_senior.csv", spacing=0.1)
    assert len(cases) == 150 and cases[0].xy.shape == (19, 2)
    assert all(c.image.exists() for c in cases[:5])
    hand = read_landmark_csv(hand_dir / "landmarks.csv")
    assert len(hand) == 112 and hand[0].xy.shape == (37, 2)
    assert {c.split for c in hand} == {"train", "valid"} and sum(c.split == "train" for c in hand) == 91


def test_bad_csv_is_reported_with_its_line(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("image_path,1_x,1_y\na.jpg,1,2\nb.jpg,3,oops\n")
    with pytest.raises(ValueError, match=r"x.csv:3: bad coordinate row"):
        read_landmark_csv(p)


def test_platt_calibration_recovers_a_known_map():
    from MedSapiensLandmarksLib.calibration import apply, fit_platt, flag_stats, reliability

    rng = np.random.default_rng(0)
    raw = rng.uniform(0.02, 0.98, 20000)
    true_a, true_b = 2.0, -1.0  # the network is under-confident and biased
    p = 1 / (1 + np.exp(-(true_a * np.log(raw / (1 - raw)) + true_b)))
    hit = rng.random(raw.size) < p
    a, b = fit_platt(raw, hit, prior=1e-6)
    assert abs(a - true_a) < 0.1 and abs(b - true_b) < 0.1
    cal = apply({"a": a, "b": b}, raw)
    assert reliability(cal, hit)["ece"] < 0.02 < reliability(raw, hit)["ece"]
    # with few points the prior keeps the raw confidence (a=1, b=0) rather than a wild fit
    a2, b2 = fit_platt(raw[:3], hit[:3], prior=1.0)
    assert abs(a2 - 1) < 1 and abs(b2) < 1
    stats = flag_stats(np.array([0.1, 0.9, 0.4, 0.8]), np.array([3.0, 2.5, 1.0, 0.5]))
    assert stats == {"flagged_pct": 50.0, "caught_pct": 50.0, "errors_over_radius": 2}


def test_a_sites_error_scale_is_recovered_from_errors_drawn_from_the_model():
    from MedSapiensLandmarksLib.calibration import apply, error_scale2, fit_scale, rescaled

    rng = np.random.default_rng(1)
    prob, dof = rng.uniform(0.3, 0.95, 4000), 3.0
    # 2D Student-t errors of the site: twice the scale the error model gives each point
    scale = 2.0 * np.sqrt(error_scale2(prob, dof))
    xy = rng.standard_normal((prob.size, 2)) * (scale / np.sqrt(rng.chisquare(dof, prob.size) / dof))[:, None]
    errors = np.linalg.norm(xy, axis=1)
    assert abs(fit_scale(prob, errors, dof, prior_points=0) - 2.0) < 0.1
    assert abs(fit_scale(prob, errors, dof) - 2.0) < 0.1  # a prior of 19 points hardly matters here
    few = fit_scale(prob[:19], errors[:19], dof)  # one case: moved part of the way
    assert 1.0 < few < fit_scale(prob[:19], errors[:19], dof, prior_points=0)
    # the widened probability is the share of those errors within 2 mm
    widened = rescaled(prob, 2.0, dof)
    assert np.all(widened < prob) and abs(widened.mean() - (errors <= 2.0).mean()) < 0.02
    assert np.allclose(rescaled(prob, 1.0, dof), prob)
    cal = {"a": 1.5, "b": 0.2, "radius_mm": 2.0, "tail_dof": dof}
    assert np.allclose(apply({**cal, "site_scale": 2.0}, prob), rescaled(apply(cal, prob), 2.0, dof))
