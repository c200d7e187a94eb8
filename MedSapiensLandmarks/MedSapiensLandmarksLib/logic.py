"""Module logic without Qt: detect into markups, export corrected cases, fine-tune in background.

Used by the Slicer module (``MedSapiensLandmarks.py``), the browser front end and the tests,
against real MRML (Slicer or slicer-core). Imports neither torch nor onnxruntime: a backend
is only built when a model is first run.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import cephalometry
from .analysis import CEPH_NAMES
from .detector import Detector
from .export import export_case
from .landmarks import Landmarks
from .mrml import (
    ATTR_CONFIDENCE,
    ATTR_ERROR_MODEL,
    ATTR_MODEL,
    ATTR_MODEL_POINTS,
    ATTR_PLAUSIBILITY,
    LPS_TO_RAS,
    check_owner,
    corrected_flags,
    landmarks_to_node,
    observe_corrections,
    positions_ras,
    update_tracing,
    volume_to_radiograph,
)
from .processes import own_group, stop_tree


class LandmarksLogic:
    """Detect / correct / export / fine-tune over one MRML scene.

    Correction observers are keyed by the node object, not its ID: `vtkMRMLScene::Clear()`
    (File > Close Scene) resets the ID counter, so the next patient's node reuses the ID.
    """

    def __init__(self, scene: Any) -> None:
        self.scene = scene
        self._detectors: dict[tuple[str, str | None, str | None], Detector] = {}
        self._observed: dict[Any, int] = {}

    def detector(self, model: str = "default", device: str | None = None,
                 anatomy: str | None = None) -> Detector:
        """The loaded model; ``anatomy`` picks the landmark set of an official multi-dataset
        checkpoint (ignored for other models)."""
        key = _detector_key(model, device, anatomy)
        if key not in self._detectors:
            official = {"anatomy": key[2]} if key[2] else {}
            self._detectors[key] = Detector.load(model, device=device, **official)
        return self._detectors[key]

    def adapt_to_exports(self, out_dir: str | Path, model: str, names: list[str]) -> Any:
        """Refit the site layer of an export folder (`site_model.refit_site`: a ``SiteFit``, or
        None when there is no new case); the adapted model is loaded afresh on its next use."""
        from .site_model import refit_site

        adapted = refit_site(out_dir, model, names)
        if adapted is not None:
            for key in [k for k in self._detectors if k[0] == str(adapted.card)]:
                del self._detectors[key]
        return adapted

    def add_detector(self, model: str, detector: Detector, device: str | None = None,
                     anatomy: str | None = None) -> None:
        """Use an already loaded detector for ``model`` (loaded before the scene libraries)."""
        self._detectors[_detector_key(model, device, anatomy)] = detector

    def observe(self, markups_node: Any) -> None:
        """Track corrections on this node (a node picked by the user, or loaded from a scene)."""
        for node in [n for n in self._observed if not self.scene.IsNodePresent(n)]:
            node.RemoveObserver(self._observed.pop(node))  # nodes gone with a closed scene
        if markups_node is not None and markups_node not in self._observed:
            self._observed[markups_node] = observe_corrections(markups_node)

    def detect(self, volume_node: Any, model: str = "default", markups_node: Any | None = None,
               slice_index: int | None = None, axis: int = 2, device: str | None = None,
               anatomy: str | None = None) -> Any:
        """Run the model on the volume (or one slice of it) and write/update the markups node."""
        image = volume_to_radiograph(volume_node, slice_index, axis)
        lm = self.detector(model, device, anatomy).detect(image)
        node = landmarks_to_node(self.scene, lm, markups_node,
                                 name=f"{volume_node.GetName()} landmarks", volume_node=volume_node)
        self.observe(node)
        return node

    def current_landmarks(self, volume_node: Any, markups_node: Any, slice_index: int | None = None,
                          axis: int = 2) -> tuple[Any, Landmarks]:
        """The markups node as it is now (after corrections), in the volume's pixel frame; points
        marked missing are NaN. Refuses a node that holds another volume's points."""
        check_owner(markups_node, volume_node)
        image = volume_to_radiograph(volume_node, slice_index, axis)
        n = markups_node.GetNumberOfControlPoints()
        lps = positions_ras(markups_node) * LPS_TO_RAS
        conf = json.loads(markups_node.GetAttribute(ATTR_CONFIDENCE) or "[]") or [float("nan")] * n
        names = [markups_node.GetNthControlPointLabel(i) for i in range(n)]
        descs = [markups_node.GetNthControlPointDescription(i).split(" (confidence")[0] for i in range(n)]
        lm = Landmarks(names, descs, image.to_pixels(lps), lps, np.asarray(conf, float),
                       {"model": markups_node.GetAttribute(ATTR_MODEL) or "", "image": image.path,
                        "error_model": json.loads(markups_node.GetAttribute(ATTR_ERROR_MODEL) or "null")})
        model_points = json.loads(markups_node.GetAttribute(ATTR_MODEL_POINTS) or "null")
        if model_points:  # what the model itself detected (before corrections and a site layer)
            lm.meta["model_pixels"], lm.meta["model_ref"] = np.array(model_points["pixels"]), model_points["ref"]
            if "raw_confidence" in model_points:
                lm.meta["raw_confidence"] = np.array(model_points["raw_confidence"])
        lm.meta["position_status"] = [markups_node.GetPositionStatusAsString(
            markups_node.GetNthControlPointPositionStatus(i)) for i in range(n)]
        verdict = markups_node.GetAttribute(ATTR_PLAUSIBILITY)
        if verdict:
            lm.meta["plausibility"] = json.loads(verdict)
        return image, lm

    def measurements(self, volume_node: Any, markups_node: Any, slice_index: int | None = None,
                     axis: int = 2) -> list[dict[str, Any]]:
        """Cephalometric analyses of the node's points as they are now (19 ISBI landmarks; else
        none), with 90 % intervals from the calibrated confidences; a corrected point counts as
        a clinician's placement (`cephalometry.CORRECTED_PROBABILITY`)."""
        labels = [markups_node.GetNthControlPointLabel(i) for i in range(markups_node.GetNumberOfControlPoints())]
        if tuple(labels) != CEPH_NAMES:  # before reading the image: this runs while points are dragged
            return []
        image, lm = self.current_landmarks(volume_node, markups_node, slice_index, axis)
        return cephalometry.analyse_landmarks(image, lm, corrected_flags(markups_node)) or []

    def tracing(self, markups_node: Any, visible: bool) -> list[Any]:
        """Show (creating or moving) or hide the analyses' reference lines of a 19-point node."""
        return update_tracing(self.scene, markups_node, cephalometry.TRACING_LINES, visible)

    def export(self, volume_node: Any, markups_node: Any, out_dir: str | Path,
               case_id: str | None = None, overwrite: bool = False,
               slice_index: int | None = None, axis: int = 2, report: bool = False) -> Path:
        """Save image + corrected points as a training case (see `export.export_case`); with
        ``report``, also the patient report ``report.pdf`` in the case folder (needs matplotlib)."""
        image, lm = self.current_landmarks(volume_node, markups_node, slice_index, axis)
        case_id = case_id or volume_node.GetName()
        flags = corrected_flags(markups_node)
        write_report = None
        if report:
            from .patient_report import write_patient_report

            analyses = cephalometry.analyse_landmarks(image, lm, flags)

            def write_report(folder: Path) -> None:
                write_patient_report(folder / "report.pdf", image, lm, flags, analyses, patient=case_id)
        return export_case(out_dir, case_id, image, lm, flags, overwrite=overwrite, extra=write_report)

    def cleanup(self) -> None:
        for node, tag in self._observed.items():
            node.RemoveObserver(tag)
        self._observed.clear()


def _detector_key(model: str, device: str | None, anatomy: str | None) -> tuple[str, str | None, str | None]:
    """Cache key of a loaded model; the anatomy only counts for official .pth checkpoints."""
    return str(model), device, anatomy if anatomy and str(model).endswith(".pth") else None


# Fine-tuning recipe of the Fine-tune buttons, chosen on a new-site proxy (junior annotations,
# training images only): 20 + 10 epochs recovered 0.74 / 0.87 mm of MRE from 10 / 25 cases where
# 5 + 3 recovered 0.15 / 0.68 (docs/benchmarks.md, "Fine-tune recipe").
FINETUNE_EPOCHS = {"coarse_epochs": 20, "refine_epochs": 10}


class FinetuneJob:
    """``medsapiens-landmarks train --cases ... --init ...`` in a child process.

    A reader thread collects its output, so `progress` and `running` never block a GUI. The
    child leads its own process group (session): inside Slicer ``python`` is the PythonSlicer
    launcher, which runs the real interpreter as its child, and `cancel` must stop both.
    """

    def __init__(self, cases_dir: str | Path, out_dir: str | Path, init: str = "default",
                 coarse_epochs: int = FINETUNE_EPOCHS["coarse_epochs"],
                 refine_epochs: int = FINETUNE_EPOCHS["refine_epochs"], python: str | None = None,
                 on_line: Callable[[str], None] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.total = coarse_epochs + refine_epochs
        cmd = [python or sys.executable, "-m", "MedSapiensLandmarksLib.cli", "train", "--cases",
               str(cases_dir), "--init", str(init), "-o", str(out_dir), "--coarse-epochs",
               str(coarse_epochs), "--refine-epochs", str(refine_epochs)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=str(Path(__file__).resolve().parents[1]), **own_group())
        self.lines: list[str] = []
        self.epochs_done = 0
        self.cancelled = False
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

    def cancel(self, timeout: float = 10.0, wait: bool = True) -> None:
        """Stop the whole process tree (launcher and interpreter): TERM, then KILL after
        ``timeout``. With ``wait=False`` (a GUI) this returns at once; `running` turns False
        when the tree is gone."""
        if self.proc.poll() is not None:
            return
        self.cancelled = True
        stopper = threading.Thread(target=stop_tree, args=(self.proc, timeout), daemon=True)
        stopper.start()
        if wait:
            stopper.join()
            self._reader.join(timeout=timeout)

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        self.proc.wait(timeout=timeout)
        self._reader.join()
        return self.result()

    def result(self) -> dict[str, Any]:
        """Outcome: ``status`` is "cancelled", "failed", "accepted", "rejected" (worse on the
        held-back cases) or "unvalidated" (no check possible; ``reason`` says why)."""
        code = self.proc.wait()
        report_path = self.out_dir / "finetune.json"
        report = json.loads(report_path.read_text()) if code == 0 and report_path.exists() else {}
        if self.cancelled:
            status = "cancelled"
        elif code != 0:
            status = "failed"
        elif not report or report.get("validated") is False:
            status = "unvalidated"
        else:
            status = "accepted" if report.get("accepted") else "rejected"
        return {"returncode": code, "status": status,
                "model": str(self.out_dir / "model.json") if code == 0 and not self.cancelled else None,
                "accepted": status == "accepted", **report, "log_tail": self.lines[-5:]}
