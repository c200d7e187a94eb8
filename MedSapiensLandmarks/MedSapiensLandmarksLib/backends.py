"""Inference backends: run a stage's network on a numpy batch, return its heatmaps as numpy.

- `OnnxBackend`: ONNX Runtime on the shipped models' graphs (CPU default; no torch needed).
- `TorchBackend`: the torch nets (GPU, official Sapiens checkpoints, training validation).

Everything around the networks (framing, warp, flip test, softmax, decoding) is numpy code in
`detector` / `codec`, shared by both. Neither torch nor onnxruntime is imported until a
backend of that kind is built.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from .errors import CheckpointError


def default_threads() -> int:
    """CPU threads for inference: the machine's cores, at most 8."""
    return max(1, min(8, os.cpu_count() or 2))


class Backend(Protocol):
    name: str
    stages: tuple[str, ...]

    def run(self, stage: str, x: Any) -> Any:
        """(B, C, H, W) float32 input of ``stage`` -> (B, K, h, w) float32 heatmaps/logits."""


class OnnxBackend:
    """One ONNX Runtime session per stage graph."""

    name = "onnx"

    def __init__(self, graphs: dict[str, Path], threads: int | None = None, fold_int8: bool = False) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        if fold_int8:  # int8 weights as storage (`quantize`): back to float32 once, at load, instead
            # of dequantizing on every run (ONNX Runtime keeps Q/DQ nodes for its int8 kernels)
            opts.add_session_config_entry("session.disable_quant_qdq", "1")
        self.sessions = {}
        for stage, path in graphs.items():
            try:
                self.sessions[stage] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            except Exception as err:  # noqa: BLE001 - ORT raises its own exception types
                raise CheckpointError(f"{path}: not a readable ONNX graph ({str(err).strip()[:200]})") from None
        self.stages = tuple(self.sessions)
        self._inputs = {s: sess.get_inputs()[0].name for s, sess in self.sessions.items()}

    def run(self, stage: str, x: Any) -> Any:
        return self.sessions[stage].run(None, {self._inputs[stage]: x})[0]

    def shapes(self, stage: str) -> tuple[list[Any], list[Any]]:
        """Input and output dimensions of a stage's graph (batch is symbolic)."""
        sess = self.sessions[stage]
        return sess.get_inputs()[0].shape, sess.get_outputs()[0].shape


class TorchBackend:
    """torch nets in eval mode on a device; U-Nets in channels-last memory on CPU (15-35 %
    faster at equal output, bench/cpu_fast_path.py). Computes in float32 on every device."""

    name = "torch"

    def __init__(self, nets: dict[str, Any], device: str | None = None, threads: int | None = None,
                 channels_last: bool = True) -> None:
        import torch

        torch.set_num_threads(threads or default_threads())
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.nets = {name: net.to(self.device).eval() for name, net in nets.items()}
        self.stages = tuple(self.nets)
        self.channels_last = channels_last and self.device.type == "cpu"
        if self.channels_last:
            for net in self.nets.values():
                if net.config["family"] == "unet":
                    net.to(memory_format=torch.channels_last)

    def run(self, stage: str, x: Any) -> Any:
        import torch

        net = self.nets[stage]
        with torch.inference_mode():
            t = torch.from_numpy(x).to(self.device)
            if self.channels_last and net.config["family"] == "unet":
                t = t.contiguous(memory_format=torch.channels_last)
            return net(t).float().cpu().numpy()
