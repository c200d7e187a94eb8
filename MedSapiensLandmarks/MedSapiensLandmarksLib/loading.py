"""One way in for every model file: name / card / .pth -> (card, backend).

ONNX cards run on ONNX Runtime unless torch is asked for (or a GPU); format-1 safetensors
cards and official MedSapiens checkpoints need torch. `Detector.load` is the only caller
that builds a `Detector` from the result.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .backends import Backend, OnnxBackend, TorchBackend
from .cards import CARD_FORMAT_ONNX, INT8_WEIGHTS, default_backend, graph_paths, read_card, resolve
from .errors import CheckpointError

BACKENDS = ("onnx", "torch")


def load_model(model: str | Path = "default", device: str | None = None, threads: int | None = None,
               backend: str | None = None, **official: Any) -> tuple[dict[str, Any], Backend]:
    """Resolve ``model`` and build the backend that runs it (see module docstring)."""
    if backend not in (None, *BACKENDS):
        raise CheckpointError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    path = resolve(model)
    if path.suffix == ".pth":
        if backend == "onnx":
            raise CheckpointError(f"{path}: official checkpoints run on the torch backend only")
        from .official import load_official

        card, nets = load_official(path, **official)
        return card, _torch(nets, device, threads)
    if official:
        raise CheckpointError(f"{path}: {', '.join(official)} only apply to official .pth checkpoints")
    card = read_card(path)
    onnx_card = card["format"] == CARD_FORMAT_ONNX
    if backend is None:
        backend = default_backend(onnx_card, device)
    if backend == "onnx":
        if not onnx_card:
            raise CheckpointError(f"{path}: a safetensors model (format 1) runs on the torch backend only")
        onnx_backend = OnnxBackend(graph_paths(card, path), threads=threads,
                                   fold_int8=card.get("graph_storage") == INT8_WEIGHTS)
        check_graphs(card, onnx_backend, path)
        return card, onnx_backend
    from .checkpoints import card_nets

    return card, _torch(card_nets(card, path), device, threads)


def check_graphs(card: dict[str, Any], backend: OnnxBackend, path: Path) -> None:
    """Each graph takes the input the card frames and predicts the card's landmarks."""
    k = len(card["landmarks"])
    for stage in backend.stages:
        spec = card[stage]["input"]
        (_, chans, h, w), (_, out_k, *_) = backend.shapes(stage)
        if out_k != k:
            raise CheckpointError(f"{path}: the {stage} graph predicts {out_k} landmarks but the model "
                                  f"card names {k}")
        if [chans, h, w] != [spec.get("channels", 1), *spec["size"]]:
            raise CheckpointError(f"{path}: the {stage} graph takes {chans}x{h}x{w} inputs, the card "
                                  f"frames {spec.get('channels', 1)}x{spec['size'][0]}x{spec['size'][1]}")


def _torch(nets: dict[str, Any], device: str | None, threads: int | None) -> Backend:
    return TorchBackend(nets, device=device, threads=threads)
