"""Cephalometric analyses from the 19 ISBI 2015 landmarks, as data, with intervals.

Each measurement names its geometry (an operation on landmarks), unit, norm and source. A
norm is "mean ± SD" (or a range where the source gives one); the class says whether the value
lies below, inside or above it. Intervals come from each point's calibrated confidence: a
point with P(error <= 2 mm) = p gets the card's error model (an isotropic 2D Student-t of that
probability, its tail fitted on validation points), positions are sampled, and the 5th-95th
percentiles of each measurement form its 90 % interval; a measurement whose interval spans a
class limit is "uncertain".

Left out, because the 19 points do not define them: Steiner's incisor measurements (U1-NA,
L1-NB: incisor apices), occlusal plane to SN and Wits appraisal (functional occlusal plane:
molars/premolars), S-line and Ricketts' E-line (pronasale), Tweed's FMIA/IMPA and Downs'
incisor and occlusal-plane items (incisor axes, occlusal plane), Ricketts' facial axis (basion,
pterygoid point), McNamara's analysis (condylion, basion).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from . import analysis
from .calibration import error_scale2
from .geometry import (
    ahead_of_line,
    angle_at,
    between,
    distance,
    facing_right,
    lines,
    signed,
)
from .imageio import Radiograph
from .landmarks import Landmarks

# A point placed by a clinician: ISBI's two annotators agree within 2 mm on 60.5 % of the training
# points, i.e. each is off by sigma ~ 1.04 mm, within 2 mm with probability 0.84.
CORRECTED_PROBABILITY = 0.84
SAMPLES = 400
INTERVAL = (5.0, 95.0)  # percentiles: a 90 % interval

STEINER = "Steiner CC. Cephalometrics for you and me. Am J Orthod 1953;39:729-755"
DOWNS = ("Downs WB. Variations in facial relationships: their significance in treatment and "
         "prognosis. Am J Orthod 1948;34:812-840")
JARABAK = ("Jarabak JR, Fizzell JA. Technique and treatment with light-wire edgewise appliances, "
           "2nd ed. Mosby 1972 (after Bjork A. Prediction of mandibular growth rotation. "
           "Am J Orthod 1969;55:585-599)")
RICKETTS = ("Ricketts RM. Perspectives in the clinical application of cephalometrics. "
            "Angle Orthod 1981;51:115-150 (norms at age 9)")
LEGAN = ("Legan HL, Burstone CJ. Soft tissue cephalometric analysis for orthognathic surgery. "
         "J Oral Surg 1980;38:744-751")
ISBI = ("Wang CW et al. A benchmark for comparison of dental radiography analysis algorithms. "
        "Med Image Anal 2016;31:63-76, Table 2")


@dataclass(frozen=True)
class Measurement:
    analysis: str
    name: str
    op: str  # see OPS
    points: tuple[str, ...]  # landmarks, or for "combine" the keys of other measurements
    unit: str  # "deg", "mm" or "%"
    low: float  # norm interval (mean - SD .. mean + SD, or the source's range)
    high: float
    below: str  # meaning below / above the norm
    above: str
    definition: str
    source: str
    mean: float | None = None
    sd: float | None = None

    @property
    def key(self) -> str:
        return f"{self.analysis} {self.name}"

    @property
    def norm(self) -> str:
        unit = "°" if self.unit == "deg" else f" {self.unit}"
        if self.mean is not None and self.sd is not None:
            return f"{self.mean:g} ± {self.sd:g}{unit}"
        return f"{self.low:g}-{self.high:g}{unit}"


def _m(analysis_name: str, name: str, op: str, points: str | tuple[str, ...], unit: str, mean: float,
       sd: float, below: str, above: str, definition: str, source: str) -> Measurement:
    """A measurement with a "mean ± SD" norm; ``points`` space-separated landmarks (or, for
    "combine", a tuple of "+key" / "-key" terms)."""
    points = tuple(points.split()) if isinstance(points, str) else points
    return Measurement(analysis_name, name, op, points, unit, mean - sd, mean + sd,
                       below, above, definition, source, mean, sd)


MEASUREMENTS: tuple[Measurement, ...] = (
    _m("Steiner", "SNA", "angle", "S N A", "deg", 82, 2, "retrognathic maxilla", "prognathic maxilla",
       "angle S-N-A", STEINER),
    _m("Steiner", "SNB", "angle", "S N B", "deg", 80, 2, "retrognathic mandible", "prognathic mandible",
       "angle S-N-B", STEINER),
    _m("Steiner", "ANB", "combine", ("+Steiner SNA", "-Steiner SNB"), "deg", 2, 2, "class III skeletal pattern",
       "class II skeletal pattern", "SNA - SNB", STEINER),
    _m("Steiner", "SN-GoGn", "lines", "S N Go Gn", "deg", 32, 5, "low angle", "high angle",
       "angle between S-N and Go-Gn", STEINER),
    _m("Downs", "facial angle", "facial", "Po Or N Pog", "deg", 87.8, 3.6, "retrusive chin", "protrusive chin",
       "inferior-posterior angle between FH (Po-Or) and N-Pog", DOWNS),
    _m("Downs", "angle of convexity", "convexity", "N A Pog", "deg", 0, 5.1, "concave profile",
       "convex profile", "180° - angle N-A-Pog, positive when A lies ahead of N-Pog", DOWNS),
    _m("Downs", "A-B plane angle", "ab_plane", "A B N Pog", "deg", -4.6, 3.7, "B far behind A",
       "B ahead of A", "angle between A-B and N-Pog, negative when B lies behind A", DOWNS),
    _m("Downs", "FH-MP", "lines", "Po Or Go Me", "deg", 21.9, 3.2, "flat mandibular plane",
       "steep mandibular plane", "angle between FH (Po-Or) and the mandibular plane Go-Me", DOWNS),
    _m("Downs", "Y-axis", "lines", "Po Or S Gn", "deg", 59.4, 3.8, "horizontal growth direction",
       "vertical growth direction", "angle between FH (Po-Or) and S-Gn", DOWNS),
    _m("Bjork-Jarabak", "saddle angle", "angle", "N S Ar", "deg", 123, 5, "small saddle angle",
       "large saddle angle", "angle N-S-Ar", JARABAK),
    _m("Bjork-Jarabak", "articular angle", "angle", "S Ar Go", "deg", 143, 6, "small articular angle",
       "large articular angle", "angle S-Ar-Go", JARABAK),
    _m("Bjork-Jarabak", "gonial angle", "angle", "Ar Go Me", "deg", 130, 7, "small gonial angle",
       "large gonial angle", "angle Ar-Go-Me", JARABAK),
    _m("Bjork-Jarabak", "sum", "combine",
       ("+Bjork-Jarabak saddle angle", "+Bjork-Jarabak articular angle", "+Bjork-Jarabak gonial angle"),
       "deg", 396, 6,
       "counter-clockwise (horizontal) growth", "clockwise (vertical) growth",
       "saddle + articular + gonial angle", JARABAK),
    Measurement("Bjork-Jarabak", "S-Go/N-Me", "ratio", ("S", "Go", "N", "Me"), "%", 59.0, 63.0,
                "clockwise (vertical) growth", "counter-clockwise (horizontal) growth",
                "posterior / anterior face height, |S-Go| / |N-Me| x 100", JARABAK),
    _m("Bjork-Jarabak", "S-N", "distance", "S N", "mm", 71, 3, "short anterior cranial base",
       "long anterior cranial base", "anterior cranial base |S-N|", JARABAK),
    _m("Bjork-Jarabak", "S-Ar", "distance", "S Ar", "mm", 32, 3, "short posterior cranial base",
       "long posterior cranial base", "posterior cranial base |S-Ar|", JARABAK),
    _m("Bjork-Jarabak", "Ar-Go", "distance", "Ar Go", "mm", 44, 5, "short ramus", "long ramus",
       "ramus height |Ar-Go|", JARABAK),
    _m("Bjork-Jarabak", "Go-Me", "distance", "Go Me", "mm", 71, 5, "short mandibular body",
       "long mandibular body", "mandibular body |Go-Me|", JARABAK),
    _m("Ricketts", "convexity", "ahead", "A N Pog", "mm", 2, 2, "concave (class III) profile",
       "convex (class II) profile", "distance of A from N-Pog, positive ahead", RICKETTS),
    _m("Ricketts", "facial depth", "facial", "Po Or N Pog", "deg", 87, 3, "retrusive mandible",
       "protrusive mandible", "inferior-posterior angle between FH (Po-Or) and N-Pog", RICKETTS),
    _m("Ricketts", "mandibular plane angle", "lines", "Po Or Go Me", "deg", 26, 4.5, "flat mandibular plane",
       "steep mandibular plane", "angle between FH (Po-Or) and Go-Me", RICKETTS),
    _m("Legan-Burstone", "upper lip protrusion", "ahead", "UL Sn Pog'", "mm", 3, 1, "retrusive upper lip",
       "protrusive upper lip", "distance of the upper lip from Sn-Pog', positive ahead", LEGAN),
    _m("Legan-Burstone", "lower lip protrusion", "ahead", "LL Sn Pog'", "mm", 2, 1, "retrusive lower lip",
       "protrusive lower lip", "distance of the lower lip from Sn-Pog', positive ahead", LEGAN),
) + tuple(
    Measurement("ISBI 2015", key, "isbi", (), "mm" if key == "MW" else "" if key == "FHI" else "deg",
                *((2.0, 4.5) if key == "MW" else analysis.LIMITS[key][:2]),
                "", "", analysis.DEFINITIONS[key], ISBI)
    for key in analysis.MEASUREMENTS)

ANALYSES = tuple(dict.fromkeys(m.analysis for m in MEASUREMENTS))
# Reference lines drawn on the radiograph (Slicer views, web page, report).
TRACING_LINES = {"S-N": ("S", "N"), "N-A": ("N", "A"), "N-B": ("N", "B"), "FH": ("Po", "Or"),
                 "mandibular plane": ("Go", "Me"), "palatal plane": ("PNS", "ANS"),
                 "N-Pog": ("N", "Pog"), "Y-axis": ("S", "Gn"), "Sn-Pog'": ("Sn", "Pog'")}


def _op(m: Measurement, p: dict[str, np.ndarray], done: dict[str, np.ndarray],
        isbi: dict[str, np.ndarray]) -> np.ndarray:
    pts = [p[n] for n in m.points] if m.op not in ("combine", "isbi") else []
    if m.op == "angle":
        return angle_at(*pts)
    if m.op == "lines":
        return lines(pts[1] - pts[0], pts[3] - pts[2])
    if m.op == "facial":  # Po, Or, N, Pog
        return between(pts[0] - pts[1], pts[3] - pts[2])
    if m.op == "convexity":  # N, A, Pog
        return (180.0 - angle_at(*pts)) * np.sign(ahead_of_line(pts[1], pts[0], pts[2]))
    if m.op == "ab_plane":  # A, B, N, Pog
        return signed(pts[3] - pts[2], pts[1] - pts[0])
    if m.op == "ahead":
        return ahead_of_line(*pts)
    if m.op == "distance":
        return distance(*pts)
    if m.op == "ratio":
        return 100.0 * distance(pts[0], pts[1]) / distance(pts[2], pts[3])
    if m.op == "combine":
        return sum(-done[k[1:]] if k[0] == "-" else done[k[1:]] for k in m.points)
    if m.op == "isbi":
        return isbi[m.name]
    raise ValueError(f"unknown measurement operation {m.op!r}")


def measure_all(xy: np.ndarray, spacing: float | Sequence[float] | None,
                names: Sequence[str] = analysis.CEPH_NAMES) -> dict[str, np.ndarray]:
    """Every measurement (key -> value, with ``xy``'s leading axes) from landmarks in pixels.
    Without a pixel spacing (None), millimetre distances are NaN; angles and ratios remain. A
    measurement whose line or angle is undefined (two of its points coincide) is NaN."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return _measure_all(xy, spacing, names)


def _measure_all(xy: np.ndarray, spacing: float | Sequence[float] | None,
                 names: Sequence[str]) -> dict[str, np.ndarray]:
    known = spacing is not None
    sx, sy = (spacing, spacing) if np.isscalar(spacing) else (spacing if known else (1.0, 1.0))
    mm = facing_right(np.asarray(xy, dtype=np.float64) * [sx, sy], names.index("S"), names.index("N"))
    p = {n: mm[..., names.index(n), :] for n in analysis.CEPH_NAMES}
    isbi = analysis.measure(np.asarray(xy, dtype=np.float64), (sx, sy), names)
    done: dict[str, np.ndarray] = {}
    for m in MEASUREMENTS:
        value = np.asarray(_op(m, p, done, isbi), dtype=np.float64)
        done[m.key] = value if known or m.unit != "mm" else np.full_like(value, np.nan)
    return done


def classify(m: Measurement, value: float) -> str:
    """"normal", or the meaning of a value below / above the norm (ISBI: the class name)."""
    if np.isnan(value):
        return ""
    if m.op == "isbi":
        return analysis.CLASS_NAMES[m.name][analysis.classify({m.name: value})[m.name]]
    return m.below if value < m.low else m.above if value > m.high else "normal"


def sample_positions(xy: np.ndarray, probability: np.ndarray, spacing: Sequence[float],
                     error_model: dict[str, float], samples: int = SAMPLES, seed: int = 0) -> np.ndarray:
    """(samples, K, 2) landmark positions in pixels drawn from each point's error model."""
    dof = error_model["tail_dof"]
    scale = np.sqrt(error_scale2(probability, dof, error_model["radius_mm"]))[:, None]
    rng = np.random.default_rng(seed)
    k = len(scale)
    t = rng.standard_normal((samples, k, 2)) * np.sqrt(dof / rng.chisquare(dof, (samples, k, 1)))
    return np.asarray(xy, dtype=np.float64) + t * scale / np.asarray(spacing, dtype=np.float64)


def analyse(xy: np.ndarray, spacing: Sequence[float] | None, probability: np.ndarray | None = None,
            error_model: dict[str, float] | None = None, names: Sequence[str] = analysis.CEPH_NAMES
            ) -> list[dict[str, Any]]:
    """One row per measurement: value, norm, deviation in SD, class, 90 % interval (given
    calibrated confidences, their error model and a pixel spacing) and whether the class is
    uncertain."""
    values = measure_all(xy, spacing, names)
    absent = {n for n, p in zip(names, np.asarray(xy, float)) if not np.isfinite(p).all()}
    spread = None
    if probability is not None and error_model and spacing is not None:
        spread = measure_all(sample_positions(xy, probability, spacing, error_model), spacing, names)
    rows = []
    for m in MEASUREMENTS:
        v = float(values[m.key])
        row: dict[str, Any] = {
            "key": m.key, "analysis": m.analysis, "measurement": m.name, "value": v, "unit": m.unit,
            "norm": m.norm, "class": classify(m, v), "definition": m.definition, "source": m.source,
            "deviation_sd": (v - m.mean) / m.sd if m.sd else None, "low": None, "high": None,
            "uncertain": False, "note": _note(m, v, spacing, absent)}
        if spread is not None and not np.isnan(v):
            lo, hi = np.percentile(spread[m.key], INTERVAL)
            row.update(low=float(lo), high=float(hi),
                       uncertain=classify(m, float(lo)) != classify(m, float(hi))
                       or classify(m, float(lo)) != row["class"])
        rows.append(row)
    return rows


def _note(m: Measurement, value: float, spacing: Sequence[float] | None, absent: set[str] = frozenset()) -> str:
    if not np.isnan(value):
        return ""
    missing = [p for p in _landmarks_of(m) if p in absent]
    if missing:
        return f"undefined: {', '.join(missing)} marked missing"
    return "needs pixel spacing" if spacing is None and m.unit == "mm" else "undefined: two of its points coincide"


def _landmarks_of(m: Measurement) -> list[str]:
    """The landmarks a measurement needs (through the measurements it combines)."""
    if m.op != "combine":
        return list(m.points)
    by_key = {other.key: other for other in MEASUREMENTS}
    return list(dict.fromkeys(p for term in m.points for p in _landmarks_of(by_key[term[1:]])))


def analyse_landmarks(image: Radiograph, lm: Landmarks, corrected: Sequence[bool] | None = None
                      ) -> list[dict[str, Any]] | None:
    """`analyse` of a detection (or of corrected points): None unless they are the 19 ISBI
    landmarks; intervals only when the confidences are calibrated (``meta["error_model"]``)."""
    if tuple(lm.names) != analysis.CEPH_NAMES:
        return None
    prob = np.asarray(lm.confidence, dtype=np.float64)
    if corrected is not None:
        prob = np.where(corrected, CORRECTED_PROBABILITY, prob)
    model = lm.meta.get("error_model") if np.isfinite(prob).all() else None
    return analyse(lm.xy, image.spacing if image.spacing_known else None, prob, model)


def csv_row(rows: list[dict[str, Any]]) -> dict[str, str]:
    """One image's analyses as flat columns (value, interval, class, uncertain per measurement)."""
    out = {}
    for r in rows:
        def num(v: float | None) -> str:
            return "" if v is None or np.isnan(v) else f"{v:.4g}"
        out.update({r["key"]: num(r["value"]), f"{r['key']} low": num(r["low"]),
                    f"{r['key']} high": num(r["high"]), f"{r['key']} class": r["class"],
                    f"{r['key']} uncertain": "1" if r["uncertain"] else "0"})
    return out


def cells(row: dict[str, Any]) -> list[str]:
    """A row of `analyse` as table text: measurement, value, norm, class, 90 % interval."""
    unit = {"deg": "°", "mm": " mm", "%": " %"}.get(row["unit"], "")
    digits = 2 if row["unit"] == "" else 1
    value = row["note"] or f"{row['value']:.{digits}f}{unit}"
    interval = "" if row["low"] is None else f"{row['low']:.{digits}f} to {row['high']:.{digits}f}"
    label = row["class"] + (" (uncertain)" if row["uncertain"] else "")
    return [f"{row['analysis']}: {row['measurement']}", value, row["norm"], label, interval]
