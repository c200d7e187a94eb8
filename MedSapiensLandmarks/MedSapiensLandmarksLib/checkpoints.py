"""torch side of model files: build a card's nets, read their weights (safetensors or the
float16 ONNX graphs, by parameter name), and write a trained model as ONNX + card."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .atomic import atomic_write
from .cards import CARD_FORMAT_ONNX, STAGES, graph_paths
from .errors import CheckpointError
from .model import LandmarkNet


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


def card_nets(card: dict[str, Any], card_path: Path) -> dict[str, LandmarkNet]:
    """The card's torch nets with their trained weights (format 1 safetensors or format 2 ONNX)."""
    if card["format"] == CARD_FORMAT_ONNX:
        from .onnx_io import read_graph_weights

        state = {f"{stage}.{k}": torch.from_numpy(v)
                 for stage, path in graph_paths(card, card_path).items()
                 for k, v in read_graph_weights(path).items()}
        source = str(card_path)
    else:
        weights = card_path.parent / card["weights"]
        if not weights.exists():
            raise CheckpointError(f"{weights}: weights file named by the model card is missing")
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{weights}: not a readable safetensors file ({err})") from None
        source = str(weights)
    k = len(card["landmarks"])
    for stage in STAGES:
        bias = state.get(f"{stage}.head.bias", state.get(f"{stage}.head.final_layer.bias"))
        if bias is not None and bias.shape[0] != k:
            raise CheckpointError(f"{source}: the {stage} weights predict {bias.shape[0]} landmarks "
                                  f"but the model card names {k}")
    nets = build_nets(card)
    modules = torch.nn.ModuleDict(nets)
    # BatchNorm's batch counters are training state that no inference file carries.
    for key, value in modules.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, value)
    load_state(modules, {k2: v.float() if v.is_floating_point() else v for k2, v in state.items()}, source)
    return nets


def save_model(out_dir: Path, card: dict[str, Any], nets: dict[str, LandmarkNet]) -> Path:
    """Write ``<stage>.onnx`` (float16 weights) for each net + model.json atomically into ``out_dir``."""
    from .onnx_io import export_graph

    out_dir.mkdir(parents=True, exist_ok=True)
    graphs = {}
    for stage, net in nets.items():
        spec = card[stage]["input"]
        graphs[stage] = f"{stage}.onnx"
        export_graph(net, (spec.get("channels", 1), *spec["size"]), out_dir / graphs[stage])
    card = {k: v for k, v in card.items() if k not in ("weights", "graph_storage")}  # float16 again
    card = {**card, "format": CARD_FORMAT_ONNX, "graphs": graphs}
    with atomic_write(out_dir / "model.json") as tmp:
        tmp.write_text(json.dumps(card, indent=2) + "\n")
    return out_dir / "model.json"
