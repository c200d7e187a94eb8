"""Publishing: model zips + the model index, and the extension's own repository.

`build_assets` writes one zip per model folder (stored, fixed timestamps: the same folder
always gives the same bytes and digest) and the index that lists them (`catalog`), so no
digest is ever typed by hand. `build_extension_repo` makes the repository the Slicer
Extensions Index clones: one commit of this tree with only the embedded models.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .catalog import EMBEDDED, INDEX_FORMAT, INDEX_NAME, embedded_dir
from .cards import read_card
from .errors import CheckpointError
from .weights import sha256sum

RELEASES_URL = "https://github.com/medsapiens/SlicerMedSapiensLandmarks/releases/download"
# What the extension repository holds of this tree (the tests, benchmarks and docs stay here).
EXTENSION_PATHS = ("CMakeLists.txt", "LICENSE", "README.md", "MedSapiensLandmarks.s4ext",
                   "MedSapiensLandmarks.json", "Resources", "MedSapiensLandmarks")
# GitHub topics of the extension repository (the Index requires 3d-slicer-extension).
TOPICS = ("3d-slicer-extension", "landmark-detection", "cephalometry", "medical-imaging")
_EPOCH = (1980, 1, 1, 0, 0, 0)


def model_zip(folder: Path, out: Path) -> Path:
    """``out``: the model folder's files under ``<folder name>/``, byte-for-byte reproducible."""
    read_card(folder / "model.json")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    tmp = out.with_name(out.name + ".part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for path in files:
            info = zipfile.ZipInfo(f"{folder.name}/{path.name}", date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            zf.writestr(info, path.read_bytes())
    os.replace(tmp, out)
    return out


def detects(card: dict[str, Any]) -> str:
    return f"{len(card['landmarks'])} landmarks on {card.get('anatomy', 'a radiograph')}"


def build_assets(folders: Sequence[Path], out_dir: Path, base_url: str | None = None,
                 version: str = __version__) -> Path:
    """Zip each model folder into ``out_dir`` and write ``out_dir/index.json``; returns it."""
    base_url = (base_url or f"{RELEASES_URL}/models-v{version}").rstrip("/")
    out_dir.mkdir(parents=True, exist_ok=True)
    models = {}
    for folder in folders:
        card = read_card(folder / "model.json")
        archive = model_zip(folder, out_dir / f"{folder.name}-{version}.zip")
        models[folder.name] = {"version": version, "url": f"{base_url}/{archive.name}",
                               "sha256": sha256sum(archive), "size": archive.stat().st_size,
                               "detects": detects(card), "name": card.get("name", folder.name)}
    index = out_dir / INDEX_NAME
    index.write_text(json.dumps({"format": INDEX_FORMAT, "models": models}, indent=2) + "\n", encoding="utf-8")
    return index


def build_extension_repo(source: Path, out: Path, embedded: Sequence[str] = EMBEDDED) -> Path:
    """``out``: a new git repository, one commit of ``source``'s files (tracked, or new and not
    ignored) with only the ``embedded`` models (the model index lists the rest); the module's CMake list follows."""
    if out.exists():
        raise FileExistsError(f"{out}: already exists; give a new folder")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=source, capture_output=True, text=True)
    if listed.returncode != 0:
        raise ValueError(f"{source}: not a git checkout ({listed.stderr.strip()})")
    tracked = listed.stdout.split("\0")
    models = Path("MedSapiensLandmarks") / "Resources" / "Models"
    keep = []
    for name in filter(None, tracked):
        rel = Path(name)
        if rel.parts[0] not in EXTENSION_PATHS:
            continue
        if rel.parent.parent == models and rel.parent.name not in embedded:
            continue
        keep.append(rel)
    missing = [m for m in embedded if not (source / models / m / "model.json").is_file()]
    if missing:
        raise CheckpointError(f"embedded model(s) not in the tree: {', '.join(missing)}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for rel in keep:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / rel, tmp / rel)
        cmake = tmp / "MedSapiensLandmarks" / "CMakeLists.txt"
        dropped = {f"Resources/Models/{p.parent.name}/" for p in (source / models).glob("*/model.json")} - {
            f"Resources/Models/{m}/" for m in embedded}
        lines = cmake.read_text(encoding="utf-8").splitlines(keepends=True)
        cmake.write_text("".join(l for l in lines if not any(d in l for d in dropped)), encoding="utf-8")
        git = ["git", "-c", "user.name=MedSapiensLandmarks release", "-c", "user.email=release@medsapiens.invalid",
               "-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false"]
        subprocess.run([*git, "init", "-q"], cwd=tmp, check=True)
        subprocess.run([*git, "add", "-A"], cwd=tmp, check=True)
        subprocess.run([*git, "commit", "-q", "-m", f"MedSapiensLandmarks {__version__}"], cwd=tmp, check=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def release_folders(names: Sequence[str] | None = None) -> list[Path]:
    """The tree's model folders to publish (all of them by default)."""
    root = embedded_dir()
    folders = sorted(p.parent for p in root.glob("*/model.json"))
    if names:
        unknown = set(names) - {f.name for f in folders}
        if unknown:
            raise CheckpointError(f"not a model folder of {root}: {', '.join(sorted(unknown))}")
        folders = [f for f in folders if f.name in names]
    return folders
