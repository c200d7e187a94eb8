"""Python dependencies inside 3D Slicer: asked for on first use, never at import time.

Detection with a shipped (ONNX) model needs only onnxruntime; fine-tuning and torch models
(official .pth checkpoints, format-1 safetensors cards) need torch + torchvision, which come
from the PyTorch extension's installer, plus timm.
"""
from __future__ import annotations

import importlib
import importlib.util

# What each kind of work needs: import name -> pip requirement (None: from the PyTorch extension).
NEEDS: dict[str, dict[str, str | None]] = {
    "onnx": {"onnxruntime": "onnxruntime>=1.17"},
    "torch": {"torch": None, "torchvision": None, "timm": "timm>=1.0",
              "safetensors": "safetensors>=0.4", "onnx": "onnx>=1.15", "tqdm": "tqdm>=4.60"},
    "report": {"matplotlib": "matplotlib>=3.7"},
}


def missing_packages(kind: str) -> list[str]:
    """Import names of ``kind``'s packages ("onnx", "torch" or "report") that are not installed."""
    return [name for name in NEEDS[kind] if importlib.util.find_spec(name) is None]


def ensure_dependencies(kind: str = "onnx", ask: bool = True, testing: bool = False) -> bool:
    """Install what ``kind`` of work misses (Slicer only). False if the user declined, or in
    testing mode, where nothing is ever installed."""
    missing = missing_packages(kind)
    if not missing:
        return True
    if testing:
        return False
    import slicer

    if {"torch", "torchvision"} & set(missing):
        try:
            import PyTorchUtils
        except ImportError:
            raise RuntimeError("torch is missing: install the 'PyTorch' extension from the "
                               "Extensions Manager, restart Slicer, then try again") from None
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=ask) is None:
            return False
    others = [NEEDS[kind][n] for n in missing if NEEDS[kind][n]]
    if others:
        if ask and not slicer.util.confirmOkCancelDisplay(
                "MedSapiensLandmarks needs these Python packages: " + ", ".join(others)
                + ". Install them now?", "Install dependencies"):
            return False
        slicer.util.pip_install(others)
    importlib.invalidate_caches()  # pip_install does not: make the new packages importable
    return not missing_packages(kind)
