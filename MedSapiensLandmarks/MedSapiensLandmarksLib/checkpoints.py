"""Model files: our own format (safetensors + JSON model card) and official MedSapiens files."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_write
from .model import LandmarkNet

CARD_FORMAT = "medsapiens-landmarks-model/1"
DEFAULT_MODEL = "ceph-default"


class CheckpointError(ValueError):
    """A model file that cannot be used; the message names the file and the problem."""


def models_dir() -> Path:
    """Shipped models: $MEDSAPIENS_MODELS, else the module's Resources/Models.

    The module folder holds the Lib and Resources side by side both in the source tree and in
    an installed Slicer extension, so the same relative path works in both.
    """
    env = os.environ.get("MEDSAPIENS_MODELS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "Resources" / "Models"


def resolve(model: str | Path) -> Path:
    """Shipped model name ("default" included), path, or ``URL#sha256=HEX`` -> an existing path.

    URLs are downloaded once into the per-user cache and checked against the SHA256.
    """
    name = DEFAULT_MODEL if str(model) == "default" else str(model)
    if "://" in name:
        from .weights import fetch

        url, _, digest = name.partition("#sha256=")
        if len(digest) != 64:
            raise CheckpointError(f"{url}: a model URL needs '#sha256=<64 hex digits>'")
        return fetch(url, digest)
    shipped = models_dir() / name
    if shipped.is_dir():
        return shipped / "model.json"
    path = Path(model)
    if path.is_dir():
        path = path / "model.json"
    if not path.exists():
        raise CheckpointError(f"{model}: model not found (neither a shipped model in "
                              f"{models_dir()} nor an existing file)")
    return path


def load_model(model: str | Path = "default", device: str | None = None):
    """Build a `Detector` from a model card, a model folder, or an official .pth checkpoint."""
    path = resolve(model)
    if path.suffix == ".pth":
        from .official import load_official

        return load_official(path, device=device)
    return load_card_model(path, device=device)


def read_card(path: Path) -> dict[str, Any]:
    try:
        card = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable model card ({err})") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise CheckpointError(f"{path}: not a model card (expected \"format\": \"{CARD_FORMAT}\")")
    for key in ("coarse", "landmarks", "weights"):
        if key not in card:
            raise CheckpointError(f"{path}: model card lacks the '{key}' field")
    return card


STAGES = ("coarse", "context", "refine")


def build_nets(card: dict[str, Any]) -> dict[str, LandmarkNet]:
    """Untrained nets for every stage the card describes (``coarse`` is required)."""
    k = len(card["landmarks"])
    if not card.get("coarse"):
        raise CheckpointError("model card: no 'coarse' stage")
    nets = {}
    for stage in STAGES:
        spec = card.get(stage)
        if not spec:
            continue
        if spec["net"].get("num_keypoints", k) != k:
            raise CheckpointError(f"model card: {stage} net has {spec['net']['num_keypoints']} "
                                  f"outputs but the card names {k} landmarks")
        try:
            nets[stage] = LandmarkNet({**spec["net"], "num_keypoints": k})
        except (KeyError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"model card: cannot build the {stage} net {spec['net']} ({err})") from None
    return nets


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load whose error names the missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("wrong shapes", shapes)):
            if keys:
                more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
                parts.append(f"{label}: {', '.join(keys[:8])}{more}")
        raise CheckpointError(f"{source}: weights do not match the model; " + "; ".join(parts))
    module.load_state_dict(state)


def load_card_model(card_path: Path, device: str | None = None):
    from .detector import Detector

    card = read_card(card_path)
    weights = card_path.parent / card["weights"]
    if not weights.exists():
        raise CheckpointError(f"{weights}: weights file named by the model card is missing")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({err})") from None
    k = len(card["landmarks"])
    for stage in STAGES:
        bias = state.get(f"{stage}.head.bias", state.get(f"{stage}.head.final_layer.bias"))
        if bias is not None and bias.shape[0] != k:
            raise CheckpointError(f"{weights}: the {stage} weights predict {bias.shape[0]} landmarks "
                                  f"but the model card names {k}")
    nets = build_nets(card)
    load_state(torch.nn.ModuleDict(nets), state, str(weights))
    return Detector(card, nets, device=device).use_channels_last()


def save_model(out_dir: Path, card: dict[str, Any], nets: dict[str, torch.nn.Module]) -> Path:
    """Write model.safetensors (keys ``<stage>.<param>``) + model.json atomically into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = torch.nn.ModuleDict(nets).state_dict()
    # float16 storage halves the file; loading copies back into the float32 parameters
    state = {k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in state.items()}
    card = {**card, "format": CARD_FORMAT, "weights": "model.safetensors"}
    with atomic_write(out_dir / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    with atomic_write(out_dir / "model.json") as tmp:
        tmp.write_text(json.dumps(card, indent=2) + "\n")
    return out_dir / "model.json"
