"""Model cards (JSON) and where model files are found; no torch, no onnxruntime.

A card names the landmarks, each stage's network and input framing, and the weights:
format 2 (``"graphs": {stage: file.onnx}``, float16 weights, what ships) or format 1
(``"weights": "model.safetensors"``, read by the torch backend).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .catalog import Progress, cached_card, embedded_dir, fetch_model, read_index
from .errors import CheckpointError

CARD_FORMAT_ONNX = "medsapiens-landmarks-model/2"
CARD_FORMAT_SAFETENSORS = "medsapiens-landmarks-model/1"
DEFAULT_MODEL = "ceph-default"  # the release model; ceph-isbi2015 is the protocol model
ALIASES = {"default": DEFAULT_MODEL}
STAGES = ("coarse", "context", "refine")
INT8_WEIGHTS = "int8-weights"  # a card's "graph_storage" when `quantize` stored its weights as int8


def model_folders() -> list[Path]:
    """Where models are looked up by name: the folders of $MEDSAPIENS_MODELS (an os.pathsep
    list; offline sites copy model folders there), then the embedded models.

    The module folder holds the Lib and Resources side by side in the source tree, in an
    installed Slicer extension and in the wheel, so the embedded path works in all three.
    """
    env = os.environ.get("MEDSAPIENS_MODELS", "")
    return [Path(p) for p in env.split(os.pathsep) if p] + [embedded_dir()]


def local_model(name: str) -> Path | None:
    """The folder of a model called ``name`` in `model_folders`, if any."""
    return next((folder / name for folder in model_folders() if (folder / name / "model.json").is_file()), None)


def needs_download(model: str) -> dict[str, Any] | None:
    """The index entry of ``model`` (a name or "default") when neither a models folder nor the
    cache holds it: what `resolve` would download."""
    name = ALIASES.get(model, model)
    entry = read_index().get(name) if local_model(name) is None else None
    return entry if entry is not None and cached_card(entry) is None else None


def model_names() -> list[str]:
    """Every model that can be asked for by name: local folders, then the index."""
    names = {p.name for folder in model_folders() if folder.is_dir() for p in folder.iterdir()
             if (p / "model.json").is_file()}
    return sorted(names) + sorted(set(read_index()) - names)


def resolve(model: str | Path, progress: Progress | None = None) -> Path:
    """Model name ("default" included), path, or ``URL#sha256=HEX`` -> an existing path.

    A name is looked up in `model_folders`, then in the model index (downloaded once into the
    per-user cache, with ``progress(done, total)``). URLs are downloaded once and checked against
    the SHA256; a ``.zip`` (a model folder published as a release asset) is unpacked, once.
    """
    name = ALIASES.get(str(model), str(model))
    if "://" in name:
        from .weights import fetch, unpack

        url, _, digest = name.partition("#sha256=")
        if len(digest) != 64:
            raise CheckpointError(f"{url}: a model URL needs '#sha256=<64 hex digits>'")
        path = fetch(url, digest, progress=progress)
        return resolve(unpack(path)) if path.suffix == ".zip" else path
    plain = Path(name).name == name and not name.startswith(".")  # "./x" and "a/b" are paths
    folder = local_model(name) if plain else None
    if folder is not None:
        return folder / "model.json"
    if plain and name in read_index():
        return fetch_model(name, progress)
    path = Path(model)
    if path.is_dir():
        path = path / "model.json"
    if not path.exists():
        raise CheckpointError(f"{model}: model not found (neither a model name - "
                              f"{', '.join(model_names()) or 'none here'} - nor an existing file)")
    return path


def read_card(path: Path) -> dict[str, Any]:
    try:
        card = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable model card ({err})") from None
    formats = (CARD_FORMAT_ONNX, CARD_FORMAT_SAFETENSORS)
    if not isinstance(card, dict) or card.get("format") not in formats:
        raise CheckpointError(f"{path}: not a model card (expected \"format\": one of {', '.join(formats)})")
    weights_key = "graphs" if card["format"] == CARD_FORMAT_ONNX else "weights"
    for key in ("coarse", "landmarks", weights_key):
        if key not in card:
            raise CheckpointError(f"{path}: model card lacks the '{key}' field")
    return card


def base_card_path(card: dict[str, Any]) -> Path:
    """The card whose graphs an adapted model (``adapt``: a card with ``"base"``) runs."""
    path = resolve(card["base"])
    if "base" in read_card(path):
        raise CheckpointError(f"{path}: the base of an adapted model must not be adapted itself")
    return path


def graph_paths(card: dict[str, Any], card_path: Path) -> dict[str, Path]:
    """Stage -> ONNX file of a format-2 card, each checked to exist."""
    graphs = card["graphs"]
    if not isinstance(graphs, dict) or "coarse" not in graphs or set(graphs) - set(STAGES):
        raise CheckpointError(f"{card_path}: 'graphs' must map stages ({', '.join(STAGES)}) to "
                              f".onnx files, with 'coarse' among them")
    root = base_card_path(card).parent if "base" in card else card_path.parent  # an adapted model's
    paths = {stage: root / graphs[stage] for stage in STAGES if stage in graphs}
    for stage, path in paths.items():
        if stage not in card:
            raise CheckpointError(f"{card_path}: graph for stage '{stage}' but no '{stage}' entry")
        if not path.exists():
            raise CheckpointError(f"{path}: ONNX graph named by the model card is missing")
    return paths


def default_backend(onnx_card: bool, device: str | None) -> str:
    """The backend `loading.load_model` picks when none is asked for: ONNX Runtime for a
    format-2 card on the CPU, torch for anything else (format 1, a GPU device)."""
    return "onnx" if onnx_card and device in (None, "cpu") else "torch"


def backend_kind(model: str | Path, device: str | None = None) -> str:
    """"onnx" or "torch": what ``model`` on ``device`` will load (decides which packages
    Slicer must install before Detect); reads only the card."""
    path = resolve(model)
    onnx_card = path.suffix != ".pth" and read_card(path)["format"] == CARD_FORMAT_ONNX
    return default_backend(onnx_card, device)
