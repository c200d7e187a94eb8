"""Cephalometric analysis: the 8 measurements and classes of the ISBI 2015 challenge.

Definitions and class limits follow Wang et al., "A benchmark for comparison of dental
radiography analysis algorithms", Medical Image Analysis 31 (2016), Table 2, with landmark
numbers L1..L19 = S, N, Or, Po, A, B, Pog, Me, Gn, Go, LIT, UIT, UL, LL, Sn, Pog', PNS, ANS, Ar:

- ANB  = angle A-N-B (SNA - SNB)               C1 3.2-5.7 (class I) | C2 > 5.7 (II) | C3 < 3.2 (III)
- SNB  = angle S-N-B                           C1 74.6-78.7 | C2 < 74.6 retrognathic | C3 > 78.7 prognathic
- SNA  = angle S-N-A                           C1 79.4-83.2 | C2 > 83.2 prognathic | C3 < 79.4 retrognathic
- ODI  = angle(AB, Me-Go) + angle(ANS-PNS, Or-Po)   C1 68.4-80.5 | C2 > 80.5 deep bite | C3 < 68.4 open bite
- APDI = facial angle(FH, N-Pog) + angle(N-Pog, AB) + angle(FH, PNS-ANS)
                                               C1 77.6-85.2 | C2 < 77.6 class II | C3 > 85.2 class III
- FHI  = |S-Go| / |N-Me|                        C1 0.65-0.75 | C2 > 0.75 short face | C3 < 0.65 long face
- FMA  = angle(FH, Me-Go)                       C1 26.8-31.4 | C2 > 31.4 high angle | C3 < 26.8 low angle
- MW   = UIT-LIT distance, negative when the lower incisor is ahead (mm)
                                               C1 2-4.5 | C2 0-2 edge to edge | C3 < 0 cross bite | C4 > 4.5 overjet

Signed plane angles follow Kim & Vietas (1978) as commonly implemented: the palatal-plane angle
is positive when ANS lies above the Frankfort-parallel through PNS, the AB-plane angle is positive
when B lies ahead of the N-Pog line. The paper gives MW = 0 for edge to edge; with continuous
positions we read C2 as 0 <= MW < 2 mm.  Images are handled in either facing direction.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .geometry import angle_at, between, distance, facing_right, lines, signed
from .landmarks import CEPH_19

MEASUREMENTS = ("ANB", "SNB", "SNA", "ODI", "APDI", "FHI", "FMA", "MW")
# (lower, upper, class below, class inside, class above); MW has its own rule
LIMITS = {"ANB": (3.2, 5.7, 3, 1, 2), "SNB": (74.6, 78.7, 2, 1, 3), "SNA": (79.4, 83.2, 3, 1, 2),
          "ODI": (68.4, 80.5, 3, 1, 2), "APDI": (77.6, 85.2, 2, 1, 3), "FHI": (0.65, 0.75, 3, 1, 2),
          "FMA": (26.8, 31.4, 3, 1, 2)}
DEFINITIONS = {
    "ANB": "angle A-N-B (SNA - SNB)", "SNB": "angle S-N-B", "SNA": "angle S-N-A",
    "ODI": "angle(A-B, Go-Me) + angle(PNS-ANS, FH)", "APDI": "facial angle + A-B plane angle + palatal plane angle",
    "FHI": "|S-Go| / |N-Me|", "FMA": "angle between FH (Po-Or) and Go-Me",
    "MW": "UIT-LIT distance, negative when the lower incisor is ahead (mm)",
}
CLASS_NAMES = {
    "ANB": {1: "class I", 2: "class II", 3: "class III"},
    "SNB": {1: "normal mandible", 2: "retrognathic mandible", 3: "prognathic mandible"},
    "SNA": {1: "normal maxilla", 2: "prognathic maxilla", 3: "retrognathic maxilla"},
    "ODI": {1: "normal", 2: "deep bite tendency", 3: "open bite tendency"},
    "APDI": {1: "normal", 2: "class II tendency", 3: "class III tendency"},
    "FHI": {1: "normal", 2: "short face tendency", 3: "long face tendency"},
    "FMA": {1: "normal", 2: "high mandibular angle", 3: "low mandibular angle"},
    "MW": {1: "normal", 2: "edge to edge", 3: "anterior cross bite", 4: "large overjet"},
}
CEPH_NAMES = tuple(name for name, _ in CEPH_19)


def measure(xy: np.ndarray, spacing: float | Sequence[float] = 0.1,
            names: Sequence[str] = CEPH_NAMES) -> dict[str, Any]:
    """The 8 measurements (degrees; FHI a ratio; MW in mm) from 19 landmarks in pixels; ``xy``
    may carry leading axes (samples), the values then have them too."""
    sx, sy = (spacing, spacing) if np.isscalar(spacing) else spacing
    p = facing_right(np.asarray(xy, dtype=np.float64) * [sx, sy], names.index("S"), names.index("N"))
    S, N, Or, Po, A, B, Pog, Me, _Gn, Go, LIT, UIT = (p[..., names.index(n), :] for n in CEPH_NAMES[:12])
    PNS, ANS = p[..., names.index("PNS"), :], p[..., names.index("ANS"), :]
    fh, palatal = Or - Po, ANS - PNS  # both pointing forward
    palatal_angle = signed(fh, palatal)  # + when ANS is tilted up
    ab_angle = signed(Pog - N, B - A)  # + when B is ahead of the N-Pog line
    facial = between(Po - Or, Pog - N)  # posterior-inferior angle of FH and N-Pog
    overjet = distance(UIT, LIT) * np.where(UIT[..., 0] >= LIT[..., 0], 1.0, -1.0)
    sna, snb = angle_at(S, N, A), angle_at(S, N, B)
    values = {
        "ANB": sna - snb,
        "SNB": snb,
        "SNA": sna,
        "ODI": lines(B - A, Me - Go) + palatal_angle,
        "APDI": facial + ab_angle + palatal_angle,
        "FHI": distance(Go, S) / distance(Me, N),
        "FMA": lines(fh, Me - Go),
        "MW": overjet,
    }
    return {k: float(v) for k, v in values.items()} if p.ndim == 2 else values


def classify(values: dict[str, float]) -> dict[str, int]:
    """Class number (1 = normal) of each measurement."""
    out = {}
    for key, value in values.items():
        if key == "MW":
            out[key] = 3 if value < 0 else 2 if value < 2 else 1 if value <= 4.5 else 4
        else:
            lo, hi, below, inside, above = LIMITS[key]
            out[key] = below if value < lo else above if value > hi else inside
    return out


def analyse(xy: np.ndarray, spacing: float | Sequence[float] = 0.1,
            names: Sequence[str] = CEPH_NAMES) -> list[dict[str, object]]:
    """Rows of measurement, value, class number and class name, for a report or a table."""
    values = measure(xy, spacing, names)
    classes = classify(values)
    return [{"measurement": k, "value": values[k], "class": classes[k],
             "meaning": CLASS_NAMES[k][classes[k]]} for k in MEASUREMENTS]


def write_analysis(path: str | Path, lm: Any, spacing: Sequence[float]) -> Path:
    """CSV of the 8 measurements of detected `Landmarks` (pixel positions, mm per pixel)."""
    from .markups import write_text

    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["measurement", "value", "class", "meaning"])
    for r in analyse(lm.xy, spacing, lm.names):
        w.writerow([r["measurement"], f"{r['value']:.3f}", r["class"], r["meaning"]])
    return write_text(path, out.getvalue())
