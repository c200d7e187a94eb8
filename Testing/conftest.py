"""Shared fixtures: paths to the shared data and reference files beside the checkout."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MedSapiensLandmarks"))
SHARED = ROOT.parent / "shared"
CEPH = SHARED / "data" / "isbi2015-ceph"
HAND = SHARED / "data" / "dha-hand"
SCHEMA = SHARED / "reference" / "markups-schema-v1.0.3.json"


@pytest.fixture(scope="session")
def ceph_dir() -> Path:
    if not (CEPH / "images" / "151.jpg").exists():
        pytest.fail(f"shared data missing: {CEPH} (CI clones with ../shared beside the repo)")
    return CEPH


@pytest.fixture(scope="session")
def hand_dir() -> Path:
    if not (HAND / "landmarks.csv").exists():
        pytest.fail(f"shared data missing: {HAND} (CI clones with ../shared beside the repo)")
    return HAND
