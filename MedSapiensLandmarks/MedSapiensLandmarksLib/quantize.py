"""int8 weight storage for graphs written by `onnx_io.export_graph` (the shipped form).

Each convolution weight (a float16 initializer + Cast to float32) becomes an int8 initializer
with one float32 scale per output channel (symmetric, zero point 0) + DequantizeLinear, so the
file halves while ONNX Runtime still computes in float32. BatchNorm parameters and biases stay
float16 (a few kB). The weight names are unchanged: `onnx_io.read_graph_weights` reads both forms.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .atomic import atomic_write
from .cards import INT8_WEIGHTS
from .errors import CheckpointError
from .onnx_io import FP32

SCALE = "::scale"


def int8_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 of ``w`` with one scale per output channel (axis 0): w ~ q * scale."""
    flat = np.abs(w.reshape(len(w), -1)).max(axis=1).astype(np.float32)
    scale = np.where(flat > 0, flat / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale.reshape(-1, *[1] * (w.ndim - 1))), -127, 127).astype(np.int8)
    return q, scale


def quantize_weights(src: Path, dst: Path, min_size: int = 1024) -> int:
    """Write ``src`` to ``dst`` with int8 convolution weights; returns how many were converted.

    Weights of fewer than ``min_size`` values (and every non-convolution weight) stay float16.
    """
    model = onnx.load(str(src))
    graph = model.graph
    conv_weights = {n.input[1] for n in graph.node if n.op_type in ("Conv", "ConvTranspose")}
    casts = {n.input[0]: n for n in graph.node
             if n.op_type == "Cast" and n.output[0].endswith(FP32) and n.output[0] in conv_weights}
    inits = {i.name: i for i in graph.initializer}
    converted: dict[str, onnx.NodeProto] = {}
    for name, cast in casts.items():
        w = numpy_helper.to_array(inits[name]).astype(np.float32)
        if w.size < min_size or w.ndim < 2:
            continue
        q, scale = int8_per_channel(w)
        inits[name].CopyFrom(numpy_helper.from_array(q, name))
        graph.initializer.append(numpy_helper.from_array(scale, name + SCALE))
        converted[name] = helper.make_node("DequantizeLinear", [name, name + SCALE], [cast.output[0]],
                                           axis=0, name=f"dequantize:{name}")
    if not casts:
        raise CheckpointError(f"{src}: no named float16 convolution weights (not a graph of this project)")
    nodes = [converted.get(n.input[0], n) if n.op_type == "Cast" else n for n in graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    with atomic_write(dst) as tmp:
        tmp.write_bytes(model.SerializeToString())
    return len(converted)


def quantize_model(card_path: Path, out_dir: Path) -> dict[str, Any]:
    """Write the model of ``card_path`` to ``out_dir`` with int8 graphs (same card otherwise)."""
    card = json.loads(card_path.read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    for graph in card["graphs"].values():
        quantize_weights(card_path.parent / graph, out_dir / graph)
    card["graph_storage"] = INT8_WEIGHTS  # ONNX Runtime folds them back to float32 at load
    with atomic_write(out_dir / "model.json") as tmp:
        tmp.write_text(json.dumps(card, indent=2) + "\n")
    return card
