"""Module logic without Qt: detect into markups, export corrected cases, fine-tune in background.

Used by the Slicer module (``MedSapiensLandmarks.py``), the browser front end and the tests,
against real MRML (Slicer or slicer-core).
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .detector import Detector
from .landmarks import Landmarks
from .export import export_case
from .mrml import (ATTR_CONFIDENCE, ATTR_MODEL, LPS_TO_RAS, corrected_flags, landmarks_to_node,
                   observe_corrections, positions_ras, volume_to_radiograph)


class LandmarksLogic:
    """Detect / correct / export / fine-tune over one MRML scene."""

    def __init__(self, scene: Any) -> None:
        self.scene = scene
        self._detectors: dict[tuple[str, str | None], Detector] = {}
        self._observed: dict[str, tuple[Any, int]] = {}

    def detector(self, model: str = "default", device: str | None = None) -> Detector:
        key = (str(model), device)
        if key not in self._detectors:
            self._detectors[key] = Detector.load(model, device=device)
        return self._detectors[key]

    def detect(self, volume_node: Any, model: str = "default", markups_node: Any | None = None,
               slice_index: int | None = None, axis: int = 2, device: str | None = None) -> Any:
        """Run the model on the volume (or one slice of it) and write/update the markups node."""
        image = volume_to_radiograph(volume_node, slice_index, axis)
        lm = self.detector(model, device).detect(image)
        node = landmarks_to_node(self.scene, lm, markups_node,
                                 name=f"{volume_node.GetName()} landmarks", volume_node=volume_node)
        if node.GetID() not in self._observed:
            self._observed[node.GetID()] = (node, observe_corrections(node))
        return node

    def current_landmarks(self, volume_node: Any, markups_node: Any, slice_index: int | None = None,
                          axis: int = 2) -> tuple[Any, Landmarks]:
        """The markups node as it is now (after corrections), in the volume's pixel frame."""
        image = volume_to_radiograph(volume_node, slice_index, axis)
        n = markups_node.GetNumberOfControlPoints()
        lps = positions_ras(markups_node) * LPS_TO_RAS
        conf = json.loads(markups_node.GetAttribute(ATTR_CONFIDENCE) or "[]") or [float("nan")] * n
        names = [markups_node.GetNthControlPointLabel(i) for i in range(n)]
        descs = [markups_node.GetNthControlPointDescription(i).split(" (confidence")[0] for i in range(n)]
        lm = Landmarks(names, descs, image.to_pixels(lps), lps, np.asarray(conf, float),
                       {"model": markups_node.GetAttribute(ATTR_MODEL) or "", "image": image.path})
        return image, lm

    def export(self, volume_node: Any, markups_node: Any, out_dir: str | Path,
               case_id: str | None = None, overwrite: bool = False,
               slice_index: int | None = None, axis: int = 2) -> Path:
        """Save image + corrected points as a training case (see `export.export_case`)."""
        image, lm = self.current_landmarks(volume_node, markups_node, slice_index, axis)
        return export_case(out_dir, case_id or volume_node.GetName(), image, lm,
                           corrected_flags(markups_node), overwrite=overwrite)

    def cleanup(self) -> None:
        for node, tag in self._observed.values():
            node.RemoveObserver(tag)
        self._observed.clear()


class FinetuneJob:
    """``medsapiens-landmarks train --cases ... --init ...`` in a child process.

    A reader thread collects its output, so `progress` and `running` never block a GUI.
    """

    def __init__(self, cases_dir: str | Path, out_dir: str | Path, init: str = "default",
                 coarse_epochs: int = 5, refine_epochs: int = 3, python: str | None = None,
                 on_line: Callable[[str], None] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.total = coarse_epochs + refine_epochs
        cmd = [python or sys.executable, "-m", "MedSapiensLandmarksLib.cli", "train", "--cases",
               str(cases_dir), "--init", str(init), "-o", str(out_dir), "--coarse-epochs",
               str(coarse_epochs), "--refine-epochs", str(refine_epochs)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=str(Path(__file__).resolve().parents[1]))
        self.lines: list[str] = []
        self.epochs_done = 0
        self._reader = threading.Thread(target=self._read, args=(on_line,), daemon=True)
        self._reader.start()

    def _read(self, on_line: Callable[[str], None] | None) -> None:
        for line in self.proc.stdout:
            line = line.rstrip()
            self.lines.append(line)
            if line.startswith("{") and '"epoch"' in line:
                self.epochs_done += 1
            if on_line:
                on_line(line)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None or self._reader.is_alive()

    @property
    def progress(self) -> float:
        return min(1.0, self.epochs_done / max(1, self.total))

    def cancel(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        self.proc.wait(timeout=timeout)
        self._reader.join()
        return self.result()

    def result(self) -> dict[str, Any]:
        """Exit code and the before/after comparison; ``accepted`` only if not worse."""
        code = self.proc.wait()
        report_path = self.out_dir / "finetune.json"
        report = json.loads(report_path.read_text()) if code == 0 and report_path.exists() else {}
        return {"returncode": code, "model": str(self.out_dir / "model.json") if code == 0 else None,
                "accepted": bool(report.get("accepted", False)), **report,
                "log_tail": self.lines[-5:]}
