"""Input files shared by the front ends (CLI, bench, web): image types, folders, case names."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .imageio import PLAIN_FORMATS

IMAGE_SUFFIXES = PLAIN_FORMATS | {".dcm", ".nrrd", ".nhdr", ".nii", ".gz", ".mha", ".mhd"}


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted)."""
    out = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    return out


def case_stem(path: Path) -> str:
    """Output name of an input file (``a.nii.gz`` -> ``a``)."""
    name = path.name
    for suffix in (".nii.gz", ".mrk.json"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem
