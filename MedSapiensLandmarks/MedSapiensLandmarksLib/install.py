"""Python dependencies inside 3D Slicer: asked for on first use, never at import time."""
from __future__ import annotations

import importlib.util

# Import name -> pip requirement (torch itself comes from the PyTorch extension's helper).
REQUIREMENTS = {"timm": "timm>=1.0", "safetensors": "safetensors>=0.4", "tqdm": "tqdm>=4.60"}


def missing_packages() -> list[str]:
    names = ["torch", *REQUIREMENTS]
    return [n for n in names if importlib.util.find_spec(n) is None]


def ensure_dependencies(ask: bool = True) -> bool:
    """Install what is missing (Slicer only). Returns False if the user declined."""
    missing = missing_packages()
    if not missing:
        return True
    import slicer

    if "torch" in missing:
        try:
            import PyTorchUtils
        except ImportError:
            raise RuntimeError("torch is missing: install the 'PyTorch' extension from the "
                               "Extensions Manager, restart Slicer, then try again") from None
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=ask)
        if torch is None:
            return False
    others = [REQUIREMENTS[n] for n in missing if n in REQUIREMENTS]
    if others:
        if ask and not slicer.util.confirmOkCancelDisplay(
                "MedSapiensLandmarks needs these Python packages: " + ", ".join(others)
                + ". Install them now?", "Install dependencies"):
            return False
        slicer.util.pip_install(others)
    return True
