"""Annotated cases: ISBI-style CSV files, the hand CSV and exported case folders."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Case:
    """One annotated image: landmarks in original pixels (x = column, y = row)."""

    image: Path
    xy: np.ndarray  # (K, 2)
    spacing: float | None = None  # mm per pixel when the image file does not carry it
    split: str = ""
    name: str = ""  # case id when the file name is not one (export folders: cases/<id>/image.nrrd)

    @property
    def case_id(self) -> str:
        return self.name or self.image.stem


def read_landmark_csv(csv_path: str | Path, image_dir: str | Path | None = None,
                      spacing: float | None = None) -> list[Case]:
    """Read ``image_path[, split], 1_x, 1_y, ...`` rows (ISBI 2015 and DHA hand layouts)."""
    csv_path = Path(csv_path)
    image_dir = Path(image_dir) if image_dir else csv_path.parent / "images"
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][0] != "image_path":
        raise ValueError(f"{csv_path}: expected a header starting with 'image_path'")
    header = rows[0]
    coord_cols = [i for i, h in enumerate(header) if h.endswith("_x") or h.endswith("_y")]
    if len(coord_cols) % 2 or not coord_cols:
        raise ValueError(f"{csv_path}: expected pairs of '<n>_x,<n>_y' columns")
    split_col = header.index("split") if "split" in header else None
    cases = []
    for line, row in enumerate(rows[1:], start=2):
        try:
            coords = np.array([float(row[i]) if row[i].strip() else np.nan  # empty: marked missing
                               for i in coord_cols]).reshape(-1, 2)
        except (ValueError, IndexError) as err:
            raise ValueError(f"{csv_path}:{line}: bad coordinate row ({err})") from None
        split = row[split_col] if split_col is not None else ""
        cases.append(Case(image_dir / row[0], coords, spacing, split))
    return cases
