"""Landmark sets of the anatomies MedSapiens was trained on, and the detection result type."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Landmarks:
    """Detection result for one image; positions in original pixels and LPS millimetres."""

    names: list[str]
    descriptions: list[str]
    xy: np.ndarray  # (K, 2) pixels, x = column, y = row
    lps: np.ndarray  # (K, 3) mm
    confidence: np.ndarray  # (K,) in [0, 1]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)


# ISBI 2015 cephalometric landmarks (Wang et al. 2016), in dataset order.
CEPH_19: list[tuple[str, str]] = [
    ("S", "sella"), ("N", "nasion"), ("Or", "orbitale"), ("Po", "porion"),
    ("A", "subspinale (A point)"), ("B", "supramentale (B point)"), ("Pog", "pogonion"),
    ("Me", "menton"), ("Gn", "gnathion"), ("Go", "gonion"),
    ("LIT", "lower incisal incision"), ("UIT", "upper incisal incision"),
    ("UL", "upper lip"), ("LL", "lower lip"), ("Sn", "subnasale"),
    ("Pog'", "soft tissue pogonion"), ("PNS", "posterior nasal spine"),
    ("ANS", "anterior nasal spine"), ("Ar", "articulare"),
]


def numbered(prefix: str, description: str, count: int) -> list[tuple[str, str]]:
    """Landmarks known only by number (hand, chest, leg sets of the multi-dataset model)."""
    return [(f"{prefix}{i}", f"{description} landmark {i}") for i in range(1, count + 1)]


HAND_37 = numbered("H", "hand", 37)


def medsapiens_names(region: str, count: int) -> list[tuple[str, str]]:
    """MedSapiens' own names (its dataset meta, ``med_sapien.py``: ``Chest_Point1`` ...)."""
    return [(f"{region}_Point{i}", f"{region.lower()} landmark {i}") for i in range(1, count + 1)]


# Channel layout of MedSapiens' 88-channel multi-dataset head: head | chest | hand | leg. The
# head channels are the ISBI 2015 landmarks in ISBI order (MedSapiens calls them Head_Point1-19).
MEDSAPIENS_MULTI: dict[str, tuple[int, list[tuple[str, str]]]] = {
    "head": (0, CEPH_19), "chest": (19, medsapiens_names("Chest", 6)),
    "hand": (25, medsapiens_names("Hand", 37)), "leg": (62, medsapiens_names("Leg", 26)),
}
