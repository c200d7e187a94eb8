"""The model index: models that are not embedded, fetched by name once and checked.

``Resources/Models/index.json`` (written by `release`, never by hand) lists each published
model: version, URL of its release zip, SHA256, size and what it detects. Asking for a listed
model that no models folder holds downloads the zip into the per-user cache (`weights.fetch`:
digest checked, nothing left behind on failure), unpacks it once, and never downloads again.
``$MEDSAPIENS_MODEL_INDEX`` points at another index (a clinic's mirror, the tests' server).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from .errors import CheckpointError

INDEX_FORMAT = "medsapiens-landmarks-index/1"
INDEX_NAME = "index.json"
ENTRY_KEYS = ("version", "url", "sha256", "size", "detects")
EMBEDDED = ("ceph-default",)  # what the Slicer extension and the wheel carry (the default model)

Progress = Callable[[int, int], None]  # (bytes done, bytes in all; 0 when unknown)


def embedded_dir() -> Path:
    """The models inside the package: ``models/`` beside this file in a wheel, else the
    module's Resources/Models (the source tree and the Slicer extension)."""
    here = Path(__file__).resolve().parent
    wheel = here / "models"
    return wheel if wheel.is_dir() else here.parent / "Resources" / "Models"


def index_path() -> Path:
    env = os.environ.get("MEDSAPIENS_MODEL_INDEX")
    return Path(env) if env else embedded_dir() / INDEX_NAME


def read_index(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """Model name -> index entry; an absent index lists nothing."""
    path = path or index_path()
    if not path.exists():
        return {}
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable model index ({err})") from None
    if not (isinstance(index, dict) and index.get("format") == INDEX_FORMAT and isinstance(index.get("models"), dict)):
        raise CheckpointError(f"{path}: not a model index (expected \"format\": \"{INDEX_FORMAT}\", \"models\")")
    for name, entry in index["models"].items():
        missing = [k for k in ENTRY_KEYS if k not in entry]
        if missing:
            raise CheckpointError(f"{path}: entry {name!r} lacks {', '.join(missing)}")
    return index["models"]


def cached_card(entry: dict[str, Any]) -> Path | None:
    """The unpacked model card of ``entry`` when it is already in the cache."""
    from .weights import cached, model_folder

    archive = cached(entry["url"], entry["sha256"])
    unpacked = archive.with_suffix("") if archive else None
    folder = model_folder(unpacked) if unpacked and unpacked.is_dir() else None
    return folder / "model.json" if folder else None


def fetch_model(name: str, progress: Progress | None = None) -> Path:
    """The card of index model ``name``, downloaded (once) and unpacked into the cache."""
    from .weights import fetch, unpack

    entry = read_index().get(name)
    if entry is None:
        raise CheckpointError(f"{name}: not in the model index {index_path()}")
    archive = fetch(entry["url"], entry["sha256"], size=entry["size"], progress=progress)
    return unpack(archive) / "model.json"

