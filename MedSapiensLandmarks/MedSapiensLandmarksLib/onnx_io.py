"""torch nets <-> ONNX graphs whose weights are float16 initializers named by parameter.

`export_graph` exports a net (BatchNorm kept, not folded into the convolutions, so float16
storage of weights that were trained or stored in float16 is exact), renames every weight
to its torch parameter name, stores it as float16 and casts it back to float32 inside the
graph (ONNX Runtime computes in float32). `read_graph_weights` reads them back by name, so a
shipped model is its graphs and nothing else: fine-tuning and ``--init`` start from them.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper

from .atomic import atomic_write
from .errors import CheckpointError

OPSET = 17
_ROLES = {"Conv": ("weight", "bias"), "ConvTranspose": ("weight", "bias"),
          "BatchNormalization": ("weight", "bias", "running_mean", "running_var")}
FP32 = "::fp32"


def export_graph(net: torch.nn.Module, input_chw: tuple[int, int, int], path: Path) -> Path:
    """Write ``net`` (dynamic batch, input ``input``, output ``heatmaps``) to ``path``."""
    state = {k: v.detach().cpu().float().numpy() for k, v in net.state_dict().items()
             if v.is_floating_point()}
    buf = io.BytesIO()
    was_training = net.training
    net.eval()
    try:
        with warnings.catch_warnings():  # the TorchScript exporter is deprecated; it is the one
            warnings.simplefilter("ignore", DeprecationWarning)  # that keeps BatchNorm unfolded
            torch.onnx.export(net, torch.zeros(1, *input_chw), buf, input_names=["input"],
                              output_names=["heatmaps"], opset_version=OPSET, dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, "heatmaps": {0: "batch"}},
                              training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    finally:
        net.train(was_training)
    model = onnx.load_from_string(buf.getvalue())
    _name_weights_fp16(model, state)
    onnx.checker.check_model(model)
    with atomic_write(path) as tmp:
        tmp.write_bytes(model.SerializeToString())
    return path


def _name_weights_fp16(model: onnx.ModelProto, state: dict[str, np.ndarray]) -> None:
    """Rewire every Conv/ConvTranspose/BatchNormalization weight input to a float16
    initializer named ``<module>.<role>`` (the torch state-dict key) + a Cast to float32."""
    graph = model.graph
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    used: dict[str, np.ndarray] = {}
    for node in graph.node:
        roles = _ROLES.get(node.op_type)
        if not roles:
            continue
        module = _module_path(node.name)
        for i, role in enumerate(roles, start=1):
            if i >= len(node.input) or not node.input[i]:
                continue
            key, src = f"{module}.{role}", node.input[i]
            while src in alias:
                src = alias[src]
            if key not in state or src not in values or not np.array_equal(values[src], state[key]):
                raise CheckpointError(f"ONNX export: cannot match input {i} of {node.name} to "
                                      f"parameter {key}")
            used[key] = state[key]
            node.input[i] = key + FP32
    missing = [k for k in state if k not in used]
    if missing:
        raise CheckpointError(f"ONNX export: parameters not found in the graph: {', '.join(missing[:5])}")
    for node in graph.node:  # anything else that read an original weight reads its cast
        node.input[:] = [n + FP32 if n in used else n for n in node.input]
    casts = [helper.make_node("Cast", [k], [k + FP32], to=onnx.TensorProto.FLOAT, name=f"cast:{k}")
             for k in used]
    # An Identity the exporter made for a de-duplicated weight is replaced by that weight.
    nodes = casts + [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in used)]
    while True:  # drop the Identity nodes the rewiring left unread
        read = {n for node in nodes for n in node.input} | {o.name for o in graph.output}
        unread = [n for n in nodes if n.op_type == "Identity" and n.output[0] not in read]
        if not unread:
            break
        nodes = [n for n in nodes if n not in unread]
    keep = [i for i in graph.initializer if i.name in read and i.name not in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    graph.initializer.extend(numpy_helper.from_array(v.astype(np.float16), k) for k, v in used.items())


def _module_path(node_name: str) -> str:
    """torch module path of an exported node: ``/backbone/encoder/layer1/layer1.0/conv1/Conv``
    -> ``backbone.encoder.layer1.0.conv1`` (a scope named ``<parent>.<i>`` replaces its parent)."""
    parts: list[str] = []
    for seg in node_name.strip("/").split("/")[:-1]:
        if parts and seg.startswith(parts[-1] + "."):
            parts[-1] = seg
        else:
            parts.append(seg)
    return ".".join(parts)


def read_graph_weights(path: Path) -> dict[str, np.ndarray]:
    """The named weights of a graph written by `export_graph` (float16) or made int8 by
    `quantize.quantize_weights`, as float32 arrays."""
    try:
        model = onnx.load(str(path))
    except (OSError, ValueError, RuntimeError, DecodeError) as err:
        raise CheckpointError(f"{path}: not a readable ONNX file ({err})") from None
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weights = {}
    for node in model.graph.node:
        if not node.output[0].endswith(FP32):
            continue
        value = inits[node.input[0]].astype(np.float32)
        if node.op_type == "DequantizeLinear":  # int8 with one scale per output channel
            value = value * inits[node.input[1]].reshape(-1, *[1] * (value.ndim - 1))
        weights[node.input[0]] = value
    return weights
