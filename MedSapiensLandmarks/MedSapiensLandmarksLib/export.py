"""Training cases from corrected detections: image (NRRD, geometry kept) + .mrk.json per case.

Folder layout (what ``train --cases DIR`` reads)::

    DIR/dataset.json            index: landmark names and the cases
    DIR/cases/<id>/image.nrrd   the radiograph slice with its LPS geometry
    DIR/cases/<id>/landmarks.mrk.json   corrected flags in the "medsapiens" block
    DIR/coco_keypoints.json     the same cases in COCO-keypoints (mmpose) format
    DIR/landmarks.csv           ISBI-style pixel coordinates

A case folder is written under a temporary name and renamed into place, so a case is either
complete or absent; an existing case is never overwritten silently (``overwrite=True`` keeps
the old one as ``<id>.previous-<n>``).  The case folders are the truth: `recover` rebuilds the
index from them after an interrupted export (a killed process, a power cut).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import SimpleITK as sitk

from .atomic import fsync_file
from .datasets import Case
from .imageio import Radiograph, read_image
from .landmarks import Landmarks
from .markups import read_markups, write_markups, write_text

INDEX_FORMAT = "medsapiens-landmarks-cases/1"
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_PREVIOUS = re.compile(r"^(.+)\.previous-(\d+)$")
CASE_FILES = ("image.nrrd", "landmarks.mrk.json")
_CONFIDENCE = re.compile(r" \(confidence [0-9.]+\)$")


class ExportError(ValueError):
    """A case that cannot be exported; nothing was written."""


def check_case_id(case_id: str) -> str:
    """The one rule for case ids (panel, web page, CLI): 1-100 letters, digits, '.', '_' or
    '-', starting with a letter or digit, not ending in ``.previous-<n>`` (the name a replaced
    case is kept under). Nothing is ever renamed to fit."""
    if not _SAFE_ID.fullmatch(case_id) or _PREVIOUS.fullmatch(case_id):
        raise ExportError(f"case id {case_id!r}: use 1-100 letters, digits, '.', '_' or '-', starting with a "
                          f"letter or digit and not ending in '.previous-<n>'")
    return case_id


def radiograph_to_itk(image: Radiograph) -> sitk.Image:
    """2D radiograph -> a one-slice 3D ITK image carrying the exact pixel_to_lps geometry."""
    pix = image.pixels
    itk = sitk.GetImageFromArray(pix[None], isVector=pix.ndim == 3)
    a = image.pixel_to_lps
    ex, ey = a[:, 0], a[:, 1]
    sx, sy = np.linalg.norm(ex), np.linalg.norm(ey)
    normal = np.cross(ex, ey)
    normal = normal / np.linalg.norm(normal) if np.linalg.norm(normal) > 0 else np.array([0, 0, 1.0])
    direction = np.c_[ex / sx, ey / sy, normal]
    itk.SetSpacing((sx, sy, 1.0))
    itk.SetOrigin(tuple(a[:, 2]))
    itk.SetDirection(direction.ravel().tolist())
    return itk


def read_index(root: Path) -> dict[str, Any]:
    path = root / "dataset.json"
    if not path.exists():
        return {"format": INDEX_FORMAT, "landmarks": [], "cases": []}
    index = json.loads(path.read_text())
    if index.get("format") != INDEX_FORMAT:
        raise ExportError(f"{path}: not a MedSapiensLandmarks case index")
    return index


def _entry(case_id: str, corrected: Sequence[bool], model: str) -> dict[str, Any]:
    return {"id": case_id, "image": f"cases/{case_id}/image.nrrd",
            "markups": f"cases/{case_id}/landmarks.mrk.json",
            "corrected": int(sum(bool(c) for c in corrected)), "model": model}


def recover(root: Path, index: dict[str, Any]) -> bool:
    """Repair what an interrupted export can leave; True when the index had to change.

    A case renamed to ``.previous-<n>`` whose replacement never arrived is put back; temporary
    folders are removed; complete case folders missing from the index are added to it.
    """
    cases_dir = root / "cases"
    if not cases_dir.is_dir():
        return False
    for tmp in [*cases_dir.glob(".*"), *root.glob(".*.tmp")]:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()
    latest: dict[str, tuple[int, Path]] = {}
    for d in cases_dir.iterdir():
        m = _PREVIOUS.match(d.name)
        if m and int(m.group(2)) > latest.get(m.group(1), (0, d))[0]:
            latest[m.group(1)] = (int(m.group(2)), d)
    for case_id, (_, prev) in latest.items():
        if not (cases_dir / case_id).exists():
            os.replace(prev, cases_dir / case_id)
    known = {e["id"]: e for e in index["cases"] if (root / e["markups"]).exists()}
    changed = len(known) != len(index["cases"])
    for d in sorted(cases_dir.iterdir()):
        if d.name in known or _PREVIOUS.match(d.name) or not all((d / f).exists() for f in CASE_FILES):
            continue
        doc = read_markups(d / "landmarks.mrk.json")
        extra = doc["extra"]
        if not index["landmarks"]:  # killed before the first index was written
            index["landmarks"] = doc["labels"]
            index["descriptions"] = [_CONFIDENCE.sub("", t) for t in doc["descriptions"]]
        known[d.name] = _entry(d.name, extra.get("corrected", []), extra.get("model", ""))
        changed = True
    index["cases"] = sorted(known.values(), key=lambda c: c["id"])
    return changed


def export_case(root: str | Path, case_id: str, image: Radiograph, lm: Landmarks,
                corrected: Sequence[bool], overwrite: bool = False,
                extra: Callable[[Path], Any] | None = None) -> Path:
    """Write one training case and refresh the index, COCO and CSV files. Returns the case folder.

    ``extra(folder)`` writes more files into the case (a report) before it is put in place."""
    root = Path(root)
    check_case_id(case_id)
    if len(corrected) != len(lm):
        raise ExportError(f"{len(corrected)} corrected flags for {len(lm)} landmarks")
    index = read_index(root)
    recover(root, index)
    names = list(lm.names)
    if index["landmarks"] and index["landmarks"] != names:
        raise ExportError(f"{root}: holds cases with landmarks {index['landmarks'][:3]}..., "
                          f"not {names[:3]}...; export to another folder")
    cases_dir = root / "cases"
    cases_dir.mkdir(parents=True, exist_ok=True)
    final = cases_dir / case_id
    if final.exists() and not overwrite:
        raise ExportError(f"{final}: case already exported (choose another id or overwrite)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{case_id}.", dir=cases_dir))
    try:
        sitk.WriteImage(radiograph_to_itk(image), str(tmp / "image.nrrd"), useCompression=True)
        kept = dataclasses.replace(lm, meta={**lm.meta, "spacing_mm": image.spacing})  # a site layer
        write_markups(tmp / "landmarks.mrk.json", kept, name=case_id, corrected=corrected)  # refits from it
        if extra is not None:
            extra(tmp)
        for f in tmp.iterdir():
            fsync_file(f)
        if final.exists():
            n = 1
            while (cases_dir / f"{case_id}.previous-{n}").exists():
                n += 1
            os.replace(final, cases_dir / f"{case_id}.previous-{n}")
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    entries = [c for c in index["cases"] if c["id"] != case_id]
    entries.append(_entry(case_id, corrected, lm.meta.get("model", "")))
    index.update(landmarks=names, cases=sorted(entries, key=lambda c: c["id"]),
                 descriptions=list(lm.descriptions))
    write_text(root / "dataset.json", json.dumps(index, indent=2) + "\n", private=True)
    write_derived(root, index)
    return final


def _records(root: Path, index: dict[str, Any]):
    """Each case of the index with its image (read once) and its landmarks in pixels."""
    for entry in index["cases"]:
        image = read_image(root / entry["image"])
        yield entry, image, image.to_pixels(read_markups(root / entry["markups"])["lps"])


def read_cases(root: str | Path) -> tuple[list[Case], list[tuple[str, str]]]:
    """Cases of an export folder (pixel landmarks from the LPS markups) and landmark names."""
    root = Path(root)
    if not (root / "dataset.json").exists():
        raise ExportError(f"{root}: no dataset.json (not an export folder)")
    index = read_index(root)
    changed = recover(root, index)
    if changed:
        write_text(root / "dataset.json", json.dumps(index, indent=2) + "\n", private=True)
    if changed or _derived_stale(root, index):
        write_derived(root, index)
    cases = [Case(root / entry["image"], xy, None, "export", entry["id"])
             for entry, _image, xy in _records(root, index)]
    descs = index.get("descriptions", index["landmarks"])
    return cases, list(zip(index["landmarks"], descs))


def _fingerprint(root: Path, index: dict[str, Any]) -> str:
    """SHA-256 over the ids and markups of the indexed cases: what the derived files show."""
    h = hashlib.sha256()
    for entry in index["cases"]:
        h.update(entry["id"].encode() + b"\0" + (root / entry["markups"]).read_bytes())
    return h.hexdigest()


def _derived_stale(root: Path, index: dict[str, Any]) -> bool:
    """True when the COCO file (written last) was not made from the current cases, e.g. an
    export was killed between the index and the derived files, or while replacing a case."""
    try:
        info = json.loads((root / "coco_keypoints.json").read_text())["info"]
    except (OSError, ValueError, KeyError, TypeError):
        return True
    return info.get("cases_sha256") != _fingerprint(root, index)


def write_derived(root: Path, index: dict[str, Any]) -> None:
    """ISBI-style CSV, then COCO-keypoints JSON (last: it carries the cases' fingerprint)."""
    names = index["landmarks"]
    images, annotations, rows = [], [], []
    for n, (entry, image, xy) in enumerate(_records(root, index), start=1):
        h, w = image.shape
        images.append({"id": n, "file_name": entry["image"], "width": w, "height": h})
        present = np.isfinite(xy).all(1)  # COCO: a point marked missing is (0, 0, visibility 0)
        x0, y0 = xy[present].min(0) if present.any() else (0.0, 0.0)
        x1, y1 = xy[present].max(0) if present.any() else (0.0, 0.0)
        kps = [v for p, ok in zip(xy, present) for v in ((float(p[0]), float(p[1]), 2) if ok else (0.0, 0.0, 0))]
        annotations.append({"id": n, "image_id": n, "category_id": 1, "iscrowd": 0,
                            "keypoints": kps, "num_keypoints": int(present.sum()),
                            "bbox": [0.0, 0.0, float(w), float(h)], "area": float(w * h),
                            "landmark_bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]})
        rows.append([entry["image"], *(f"{v:.3f}" if np.isfinite(v) else "" for v in xy.ravel())])
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["image_path"] + [f"{i}_{a}" for i in range(1, len(names) + 1) for a in ("x", "y")])
    w.writerows(rows)
    write_text(root / "landmarks.csv", out.getvalue(), private=True)
    info = {"description": "MedSapiensLandmarks export", "cases_sha256": _fingerprint(root, index)}
    coco = {"info": info, "images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "anatomy", "supercategory": "anatomy",
                            "keypoints": list(names), "skeleton": []}]}
    write_text(root / "coco_keypoints.json", json.dumps(coco, indent=1) + "\n", private=True)
