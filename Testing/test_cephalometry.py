"""Cephalometric analyses on constructed geometry with known angles and distances, intervals."""
import math

import numpy as np
import pytest

from MedSapiensLandmarksLib import cephalometry as C
from MedSapiensLandmarksLib.analysis import CEPH_NAMES
from MedSapiensLandmarksLib.calibration import error_scale2, fit_tail_dof

SPACING = (0.1, 0.1)
# A face looking right (x forward, y down), in millimetres: S-N and FH horizontal, N-Pog and
# Sn-Pog' vertical, right angles wherever the analyses measure one.
RIGHT_ANGLES = {
    "S": (0, 0), "N": (70, 0), "Or": (60, 15), "Po": (-10, 15), "A": (70, 20), "B": (70, 45),
    "Pog": (70, 65), "Me": (60, 60), "Gn": (60, 60), "Go": (0, 60), "LIT": (70, 52),
    "UIT": (72, 50), "UL": (83, 35), "LL": (78, 50), "Sn": (80, 25), "Pog'": (80, 70),
    "PNS": (20, 22), "ANS": (75, 22), "Ar": (0, 30),
}


def pixels(points_mm, spacing=SPACING):
    return np.array([points_mm[n] for n in CEPH_NAMES], dtype=float) / np.asarray(spacing)


def values(points_mm, spacing=SPACING):
    return {k: float(v) for k, v in C.measure_all(pixels(points_mm, spacing), spacing).items()}


def test_right_angle_face_gives_the_textbook_values():
    v = values(RIGHT_ANGLES)
    expected = {
        "Steiner SNA": 90, "Steiner SNB": 90, "Steiner ANB": 0, "Steiner SN-GoGn": 0,
        "Downs facial angle": 90, "Downs angle of convexity": 0, "Downs A-B plane angle": 0,
        "Downs FH-MP": 0, "Downs Y-axis": 45,
        "Bjork-Jarabak saddle angle": 90, "Bjork-Jarabak articular angle": 180,
        "Bjork-Jarabak gonial angle": 90, "Bjork-Jarabak sum": 360,
        "Bjork-Jarabak S-Go/N-Me": 100 * 60 / math.hypot(10, 60),
        "Bjork-Jarabak S-N": 70, "Bjork-Jarabak S-Ar": 30, "Bjork-Jarabak Ar-Go": 30, "Bjork-Jarabak Go-Me": 60,
        "Ricketts convexity": 0, "Ricketts facial depth": 90, "Ricketts mandibular plane angle": 0,
        "Legan-Burstone upper lip protrusion": 3, "Legan-Burstone lower lip protrusion": -2,
        "ISBI 2015 SNA": 90, "ISBI 2015 SNB": 90, "ISBI 2015 ANB": 0, "ISBI 2015 FMA": 0,
        "ISBI 2015 MW": math.hypot(2, 2),
    }
    for key, want in expected.items():
        assert v[key] == pytest.approx(want, abs=1e-6), key


def test_convexity_and_a_b_plane_have_their_documented_signs():
    forward = dict(RIGHT_ANGLES, A=(73, 20), B=(67, 45))  # A 3 mm ahead of N-Pog, B 3 mm behind
    v = values(forward)
    assert v["Ricketts convexity"] == pytest.approx(3.0)
    assert v["Downs angle of convexity"] == pytest.approx(math.degrees(math.atan(3 / 20) + math.atan(3 / 45)))
    # A-B line leans back by atan(6/25) from the vertical N-Pog: B behind A is negative
    assert v["Downs A-B plane angle"] == pytest.approx(-math.degrees(math.atan(6 / 25)))
    sna = 180 - math.degrees(math.atan2(20, 3))  # between N->S (backwards) and N->A
    assert v["Steiner SNA"] == pytest.approx(sna)
    assert v["Steiner ANB"] == pytest.approx(v["Steiner SNA"] - v["Steiner SNB"])


def test_values_do_not_depend_on_facing_direction_rotation_or_position():
    base = values(dict(RIGHT_ANGLES, A=(73, 20), Go=(3, 58)))
    a = math.radians(12)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    moved = {n: tuple(rot @ np.array(p) + [40, 90]) for n, p in dict(RIGHT_ANGLES, A=(73, 20), Go=(3, 58)).items()}
    mirrored = {n: (200 - x, y) for n, (x, y) in moved.items()}  # facing left
    for other in (values(moved), values(mirrored)):
        for key, want in base.items():
            assert other[key] == pytest.approx(want, abs=1e-6), key


def test_distances_need_a_pixel_spacing_and_angles_do_not():
    rows = {r["key"]: r for r in C.analyse(pixels(RIGHT_ANGLES), None)}
    assert rows["Bjork-Jarabak S-N"]["note"] == "needs pixel spacing"
    assert math.isnan(rows["Bjork-Jarabak S-N"]["value"]) and rows["Bjork-Jarabak S-N"]["class"] == ""
    assert rows["Steiner SNA"]["value"] == pytest.approx(90) and rows["Steiner SNA"]["note"] == ""
    assert C.cells(rows["Bjork-Jarabak S-N"])[1] == "needs pixel spacing"


def test_classes_follow_the_norms():
    rows = {r["key"]: r for r in C.analyse(pixels(RIGHT_ANGLES), SPACING)}
    assert rows["Steiner SNA"]["class"] == "prognathic maxilla"  # 90 > 82 + 2
    assert rows["Steiner SNA"]["deviation_sd"] == pytest.approx((90 - 82) / 2)
    assert rows["Bjork-Jarabak S-Ar"]["class"] == "normal"  # 30 mm within 32 ± 3
    assert rows["Bjork-Jarabak S-N"]["class"] == "normal"  # 70 mm within 71 ± 3
    assert rows["Bjork-Jarabak Ar-Go"]["class"] == "short ramus"  # 30 mm < 44 - 5
    assert rows["Legan-Burstone upper lip protrusion"]["class"] == "normal"  # 3 mm = the mean
    assert rows["ISBI 2015 MW"]["class"] == "normal"  # 2.83 mm in 2-4.5
    assert rows["ISBI 2015 ANB"]["class"] == "class III"  # 0 < 3.2


def test_every_measurement_cites_a_source_and_names_known_landmarks():
    for m in C.MEASUREMENTS:
        assert m.source and m.definition and m.low <= m.high
        if m.op not in ("combine", "isbi"):
            assert set(m.points) <= set(CEPH_NAMES), m.key
    assert set(C.ANALYSES) == {"Steiner", "Downs", "Bjork-Jarabak", "Ricketts", "Legan-Burstone", "ISBI 2015"}


def test_student_t_error_model_gives_the_calibrated_probability():
    rng = np.random.default_rng(0)
    for p, dof in [(0.5, 2.3), (0.9, 2.3), (0.8, 50.0)]:
        s = math.sqrt(error_scale2(np.array([p]), dof)[0])
        r = np.linalg.norm(rng.standard_normal((200_000, 2)) * np.sqrt(dof / rng.chisquare(dof, (200_000, 1))), axis=1) * s
        assert (r <= 2.0).mean() == pytest.approx(p, abs=0.005)


def test_tail_dof_is_recovered_from_samples():
    rng = np.random.default_rng(1)
    p = rng.uniform(0.3, 0.95, 4000)
    dof = 3.0
    s = np.sqrt(error_scale2(p, dof))
    err = np.linalg.norm(rng.standard_normal((4000, 2)) * np.sqrt(dof / rng.chisquare(dof, (4000, 1))), axis=1) * s
    assert fit_tail_dof(p, err) == pytest.approx(dof, rel=0.2)
    gauss = np.linalg.norm(rng.standard_normal((4000, 2)), axis=1) * np.sqrt(error_scale2(p, 1e6))
    assert fit_tail_dof(p, gauss) > 30


def test_interval_widens_with_doubt_and_flags_a_class_that_could_change():
    model = {"radius_mm": 2.0, "tail_dof": 2.3}
    xy = pixels(RIGHT_ANGLES)
    sure = {r["key"]: r for r in C.analyse(xy, SPACING, np.full(19, 0.995), model)}
    doubt = {r["key"]: r for r in C.analyse(xy, SPACING, np.full(19, 0.5), model)}
    for rows in (sure, doubt):
        assert rows["Steiner SNA"]["low"] <= 90 <= rows["Steiner SNA"]["high"]
    width = {k: r["high"] - r["low"] for k, r in sure.items()}
    assert all(doubt[k]["high"] - doubt[k]["low"] > 3 * width[k] for k in width)
    assert not sure["Steiner SNA"]["uncertain"]  # 90 deg, far above the norm, either way
    edge = dict(RIGHT_ANGLES, A=(70 + 20 * math.cos(math.radians(96.1)), 20 * math.sin(math.radians(96.1))))
    rows = {r["key"]: r for r in C.analyse(pixels(edge), SPACING, np.full(19, 0.6), model)}
    assert rows["Steiner SNA"]["value"] == pytest.approx(83.9) and rows["Steiner SNA"]["class"] == "normal"
    assert rows["Steiner SNA"]["uncertain"]  # 0.1 deg below the upper limit of the norm
    assert not C.analyse(xy, SPACING)[0]["uncertain"] and C.analyse(xy, SPACING)[0]["low"] is None


def test_coinciding_points_leave_their_measurements_undefined_and_the_rest_intact():
    import warnings

    flat = dict(RIGHT_ANGLES, Go=RIGHT_ANGLES["Me"])  # no mandibular plane: Go on Me
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # quietly: no division warning from numpy
        rows = {r["key"]: r for r in C.analyse(pixels(flat), SPACING)}
    undefined = {k for k, r in rows.items() if np.isnan(r["value"])}
    assert {"Downs FH-MP", "Ricketts mandibular plane angle", "Bjork-Jarabak gonial angle"} <= undefined
    assert "Steiner SNA" not in undefined and rows["Steiner SNA"]["value"] == pytest.approx(90)
    assert rows["Bjork-Jarabak Go-Me"]["value"] == pytest.approx(0)
    for key in undefined:
        assert rows[key]["note"] == "undefined: two of its points coincide" and rows[key]["class"] == ""
