"""Cephalometric measurements on constructed geometry with known angles, lengths and classes."""
import numpy as np
import pytest

from MedSapiensLandmarksLib.analysis import CEPH_NAMES, analyse, classify, measure


def polar(origin, length, degrees_below_forward):
    """Point at ``length`` mm from origin, rotated ``degrees`` clockwise (downwards) from +x."""
    t = np.radians(degrees_below_forward)
    return np.asarray(origin) + length * np.array([np.cos(t), np.sin(t)])


def skull(sna=82.0, snb=78.0, fma=25.0, mw=3.0, palatal_up=2.0):
    """19 landmarks in mm (x forward, y down) built so that the target values hold exactly."""
    p = {n: np.zeros(2) for n in CEPH_NAMES}
    p["N"] = np.array([150.0, 60.0])
    p["S"] = np.array([80.0, 60.0])  # S-N horizontal, S behind N
    p["A"] = polar(p["N"], 55.0, 180.0 - sna)  # angle S-N-A measured from the ray N->S
    p["B"] = polar(p["N"], 95.0, 180.0 - snb)
    p["Po"], p["Or"] = np.array([40.0, 90.0]), np.array([130.0, 90.0])  # FH horizontal
    p["Go"] = np.array([70.0, 150.0])
    p["Me"] = polar(p["Go"], 80.0, fma)  # mandibular plane fma degrees below FH
    p["Pog"], p["Gn"] = p["Me"] + [5.0, -8.0], p["Me"] + [3.0, -3.0]
    p["PNS"] = np.array([90.0, 110.0])
    p["ANS"] = polar(p["PNS"], 50.0, -palatal_up)  # anterior end tilted up
    p["LIT"] = np.array([140.0, 130.0])
    p["UIT"] = p["LIT"] + [mw, 0.0]
    for n in ("UL", "LL", "Sn", "Pog'", "Ar"):
        p[n] = np.array([100.0, 100.0])
    return np.stack([p[n] for n in CEPH_NAMES])


def test_angles_lengths_and_ratios_match_the_construction():
    mm = skull(sna=82.0, snb=78.0, fma=25.0, mw=3.0, palatal_up=2.0)
    m = measure(mm / 0.1, spacing=0.1)  # pixels at 0.1 mm
    assert m["SNA"] == pytest.approx(82.0, abs=1e-6) and m["SNB"] == pytest.approx(78.0, abs=1e-6)
    assert m["ANB"] == pytest.approx(4.0, abs=1e-6)
    assert m["FMA"] == pytest.approx(25.0, abs=1e-6) and m["MW"] == pytest.approx(3.0, abs=1e-6)
    s, n, go, me = (mm[CEPH_NAMES.index(k)] for k in ("S", "N", "Go", "Me"))
    assert m["FHI"] == pytest.approx(np.linalg.norm(go - s) / np.linalg.norm(me - n))
    # ODI = angle(AB, MP) + palatal angle; AB direction from the construction
    a, b = mm[CEPH_NAMES.index("A")], mm[CEPH_NAMES.index("B")]
    ab_down = np.degrees(np.arctan2((b - a)[1], (b - a)[0]))  # below +x
    assert m["ODI"] == pytest.approx(abs(ab_down - 25.0) + 2.0, abs=1e-6)


def test_values_do_not_depend_on_facing_direction_or_pixel_size():
    mm = skull()
    right = measure(mm / 0.1, spacing=0.1)
    mirrored = mm.copy()
    mirrored[:, 0] = 300.0 - mirrored[:, 0]
    left = measure(mirrored / 0.25, spacing=0.25)
    for k in right:
        assert left[k] == pytest.approx(right[k], abs=1e-6), k


@pytest.mark.parametrize("kw,key,cls", [
    ({"sna": 82, "snb": 78}, "ANB", 1), ({"sna": 84, "snb": 77}, "ANB", 2), ({"sna": 80, "snb": 79}, "ANB", 3),
    ({"snb": 72}, "SNB", 2), ({"snb": 80, "sna": 84}, "SNB", 3), ({"sna": 85, "snb": 79}, "SNA", 2),
    ({"fma": 35}, "FMA", 2), ({"fma": 20}, "FMA", 3),
    ({"mw": 3.0}, "MW", 1), ({"mw": 1.0}, "MW", 2), ({"mw": -2.0}, "MW", 3), ({"mw": 6.0}, "MW", 4),
])
def test_classes_follow_the_published_limits(kw, key, cls):
    assert classify(measure(skull(**kw), spacing=1.0))[key] == cls


def test_class_limits_are_inclusive_normal_ranges():
    assert classify({"ANB": 3.2, "FHI": 0.75, "MW": 4.5, "SNA": 83.2})["ANB"] == 1
    assert classify({"FHI": 0.7501})["FHI"] == 2 and classify({"FHI": 0.6499})["FHI"] == 3
    rows = analyse(skull(), spacing=1.0)
    assert [r["measurement"] for r in rows] == ["ANB", "SNB", "SNA", "ODI", "APDI", "FHI", "FMA", "MW"]
    assert rows[0]["meaning"] == "class I"


def test_classification_agreement_counts_changed_classes():
    from MedSapiensLandmarksLib.evaluation import analyses_agreement, isbi_agreement

    def classification_agreement(pred, truth, spacing):
        return isbi_agreement(analyses_agreement(pred, truth, spacing))

    truth = np.stack([skull(sna=82, snb=78), skull(sna=82, snb=78), skull(sna=84, snb=80)])
    same = classification_agreement(truth, truth, [1.0] * 3)
    assert same["average_accuracy_pct"] == 100.0 and same["ANB"]["mean_abs_diff"] == 0.0
    pred = truth.copy()
    pred[0] = skull(sna=82, snb=76)  # ANB 4 -> 6 (class II), SNB 78 -> 76 (still normal)
    got = classification_agreement(pred, truth, [1.0] * 3)
    assert got["ANB"]["accuracy_pct"] == pytest.approx(200 / 3)
    assert got["SNB"]["accuracy_pct"] == 100.0
    assert got["ANB"]["mean_abs_diff"] == pytest.approx(2.0 / 3, abs=1e-6)


def test_confidence_ranking_on_a_known_order():
    from MedSapiensLandmarksLib.metrics import confidence_ranking, spearman

    err = np.arange(1.0, 21.0)
    assert spearman(-err, err) == pytest.approx(-1.0) and spearman(err, err) == pytest.approx(1.0)
    r = confidence_ranking(1.0 / err, err, fraction=0.1)  # least confident = the two largest errors
    assert r["mre_least_confident_mm"] == pytest.approx(19.5)
    assert r["mre_rest_mm"] == pytest.approx(np.mean(np.arange(1.0, 19.0)))
