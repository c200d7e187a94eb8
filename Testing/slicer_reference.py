"""Slicer's own Python (parameterNodeWrapper, ScriptedLoadableModule, util) over slicer-core.

The unmodified copies in ``../shared/reference/slicer-python/<tag>/slicer`` are put on
``slicer.__path__`` (Slicer's util replaces slicer-core's for the duration); ``qt``, ``ctk``,
``slicer.i18n`` and the ``q*`` widget classes exist only as import stand-ins, so whatever
runs is Slicer's code on slicer-core's real MRML nodes. Used by ``test_slicer_panel.py``.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from contextlib import contextmanager
from typing import Any, Iterator

import slicer

from conftest import ROOT, SHARED

REFERENCE = SHARED / "reference" / "slicer-python"
VERSIONS = ("v5.6.2", "v5.12.3")
MODULE_FILE = ROOT / "MedSapiensLandmarks" / "MedSapiensLandmarks.py"
_SLICER_WIDGETS = ("qMRMLNodeComboBox", "qMRMLRangeWidget", "qMRMLScreenShotDialog", "qMRMLSliderWidget",
                   "qMRMLSpinBox", "qMRMLUtils", "qMRMLWidget", "qSlicerScriptedLoadableModule",
                   "qSlicerScriptedLoadableModuleWidget", "qSlicerWidget")


class _StandIn(types.ModuleType):
    """A module whose every public attribute is an empty class (names for annotations only)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        cls = type(name, (), {"__init__": lambda self, *a, **k: None})
        setattr(self, name, cls)
        return cls


def _load(name: str, path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextmanager
def reference_slicer(version: str, scene: Any) -> Iterator[types.ModuleType]:
    """Slicer ``version``'s Python over slicer-core with ``slicer.mrmlScene = scene``; yields the
    project's module file (``MedSapiensLandmarks.py``) imported on top of it."""
    folder = REFERENCE / version / "slicer"
    if not folder.is_dir():
        raise FileNotFoundError(f"Slicer reference copy missing: {folder}")
    saved_modules = {k: v for k, v in sys.modules.items()
                     if k in ("qt", "ctk", "slicer.util", "slicer.i18n", "MedSapiensLandmarks")
                     or k.startswith(("slicer.parameterNodeWrapper", "slicer.ScriptedLoadableModule"))}
    saved_attrs = {k: getattr(slicer, k) for k in ("util", "mrmlScene", "i18n", *_SLICER_WIDGETS)
                   if hasattr(slicer, k)}
    saved_path = list(slicer.__path__)
    try:
        for name in ("qt", "ctk"):
            sys.modules[name] = _StandIn(name)
        i18n = types.ModuleType("slicer.i18n")
        i18n.tr = i18n.translate = lambda *args: args[-1]
        sys.modules["slicer.i18n"] = slicer.i18n = i18n
        for name in _SLICER_WIDGETS:
            setattr(slicer, name, type(name, (), {}))
        for name in [k for k in sys.modules if k.startswith(("slicer.parameterNodeWrapper",
                                                               "slicer.ScriptedLoadableModule"))]:
            del sys.modules[name]
        slicer.__path__.append(str(folder))
        slicer.util = _load("slicer.util", folder / "util.py")
        slicer.mrmlScene = scene
        yield _load("MedSapiensLandmarks", MODULE_FILE)
    finally:
        for name in [k for k in sys.modules if k in ("qt", "ctk", "slicer.util", "slicer.i18n",
                                                     "MedSapiensLandmarks")
                     or k.startswith(("slicer.parameterNodeWrapper", "slicer.ScriptedLoadableModule"))]:
            del sys.modules[name]
        sys.modules.update(saved_modules)
        slicer.__path__[:] = saved_path
        for name in ("util", "mrmlScene", "i18n", *_SLICER_WIDGETS):
            if name in saved_attrs:
                setattr(slicer, name, saved_attrs[name])
            elif hasattr(slicer, name):
                delattr(slicer, name)
