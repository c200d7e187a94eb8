"""The Slicer panel's decisions, without Qt: the module widget forwards its signals here and
writes back what comes out (`PanelView`), so every rule of the panel is tested on slicer-core.

``params`` is the module's parameter node (Slicer's parameterNodeWrapper) or any object with
the same attributes: inputVolume, sliceIndex, model, device, anatomy, landmarks, exportFolder,
caseId. ``settings`` has Qt's QSettings interface (``value(key, default)``, ``setValue``):
choices that outlive a patient (model, export folder, device) are kept there, because Slicer
resets the parameter node on Close Scene.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .logic import LandmarksLogic
from .markups import LOW_CONFIDENCE
from .mrml import (apply_dicom_spacing, owner_volume, plausibility_warning, rechecked_note, ruler_spacing,
                   set_volume_spacing, spacing_text, table_rows, volume_landmarks)

ANATOMY_OWN = "checkpoint's own"  # the anatomy choice that keeps an official checkpoint's own set
DEFAULT_EXPORT_FOLDER = Path.home() / "MedSapiensLandmarks" / "cases"
DEFAULTS: dict[str, Any] = {"model": "default", "device": "auto", "exportFolder": DEFAULT_EXPORT_FOLDER}
SETTINGS_PREFIX = "MedSapiensLandmarks/"


@dataclass
class PanelView:
    """What the panel shows: enabled buttons, status lines and the landmark table."""

    detect: bool
    export: bool
    finetune: bool
    cancel: bool
    calibrate: bool
    slice_enabled: bool
    slice_max: int
    spacing: str  # the spacing with its source, or why no millimetres are shown
    notice: str  # "" or why the selected list is not this volume's
    rows: list[dict[str, Any]] = field(default_factory=list)  # name, confidence, state, index, doubtful


class PanelController:
    """One per panel; ``logic`` does the work on the scene."""

    def __init__(self, logic: LandmarksLogic, settings: Any | None = None,
                 dicom_value: Callable[[str, str], str] | None = None) -> None:
        """``dicom_value(uid, tag)`` reads a DICOM tag (Slicer: ``dicomDatabase.instanceValue``)."""
        self.logic, self.settings, self.dicom_value = logic, settings, dicom_value
        self._volume: Any = None  # the volume the panel last showed

    # -- parameter node -----------------------------------------------------------------------
    def restore(self, params: Any) -> None:
        """A new parameter node (module opened, scene closed): the user's last choices instead
        of the defaults. A value already changed from its default (a loaded scene's) is kept."""
        self._volume = None
        if self.settings is None:
            return
        for key, default in DEFAULTS.items():
            stored = self.settings.value(SETTINGS_PREFIX + key, "")
            if stored and getattr(params, key) == default:
                setattr(params, key, type(default)(stored) if key == "exportFolder" else str(stored))

    def sync(self, params: Any) -> None:
        """After any parameter change: a newly picked volume brings its own landmark list (or
        none), never the previous patient's; choices that outlive a patient are remembered."""
        volume = params.inputVolume
        if volume is not self._volume:
            self._volume = volume
            if volume is not None and self.dicom_value is not None:  # the tag that gives the mm
                apply_dicom_spacing(self.logic.scene, volume, self.dicom_value)
            own = volume_landmarks(self.logic.scene, volume)
            if params.landmarks is not own:
                params.landmarks = own
        if self.settings is not None:
            for key in DEFAULTS:
                value = str(getattr(params, key))
                if self.settings.value(SETTINGS_PREFIX + key, "") != value:
                    self.settings.setValue(SETTINGS_PREFIX + key, value)

    # -- what the panel shows -----------------------------------------------------------------
    def view(self, params: Any, job_running: bool = False) -> PanelView:
        volume = params.inputVolume if params is not None else None
        image = volume.GetImageData() if volume is not None else None
        depth = image.GetDimensions()[2] if image is not None else 1
        node = self.shown_landmarks(params)
        notice = ""
        chosen = params.landmarks if params is not None else None
        if chosen is not None and node is None:
            owner = owner_volume(chosen)
            notice = (f"'{chosen.GetName()}' holds the points of '{owner.GetName()}'; Detect writes "
                      f"this volume's own list")
        return PanelView(
            detect=volume is not None and image is not None and not job_running,
            export=node is not None and node.GetNumberOfControlPoints() > 0,
            finetune=params is not None and not job_running,
            cancel=job_running, calibrate=volume is not None, slice_enabled=depth > 1,
            slice_max=max(0, depth - 1), spacing=spacing_text(volume) if volume is not None else "",
            notice=notice, rows=_rows(node) if node is not None else [])

    def shown_landmarks(self, params: Any) -> Any | None:
        """The selected list if it may be shown with the selected volume (its own, or a list
        bound to no volume, e.g. read from a file); never another volume's."""
        if params is None or params.landmarks is None or params.inputVolume is None:
            return None
        owner = owner_volume(params.landmarks)
        return params.landmarks if owner is None or owner is params.inputVolume else None

    def analyses(self, params: Any, tracing: bool) -> tuple[str, list[dict[str, Any]]]:
        """The plausibility warning and the measurements of the shown points as they are now;
        the tracing lines follow the points, shown only when asked for and there are analyses."""
        node = self.shown_landmarks(params)
        if node is None:
            return "", []
        rows = self.logic.measurements(params.inputVolume, node, self.slice_index(params))
        self.logic.tracing(node, bool(rows) and tracing)
        return plausibility_warning(node), rows

    def finetune_folder(self, params: Any, stamp: str) -> Path:
        """Where a fine-tune started at ``stamp`` writes its model: beside the export folder."""
        return Path(params.exportFolder).parent / "models" / stamp

    def slice_index(self, params: Any) -> int | None:
        image = params.inputVolume.GetImageData()
        return params.sliceIndex if image is not None and image.GetDimensions()[2] > 1 else None

    # -- actions ------------------------------------------------------------------------------
    def download_needed(self, params: Any) -> dict[str, Any] | None:
        """The index entry of the chosen model when Detect must download it first (once)."""
        from .cards import needs_download

        return needs_download(params.model)

    def download(self, params: Any, progress: Callable[[int, int], None]) -> Path:
        """Fetch the chosen model into the per-user cache (digest checked) with ``progress``."""
        from .cards import resolve

        return resolve(params.model, progress=progress)

    def dependencies(self, params: Any) -> str:
        """What Detect needs installed: the chosen model *and* device decide the backend."""
        from .cards import backend_kind

        return backend_kind(params.model, device(params))

    def detect(self, params: Any) -> Any:
        """Detect on the selected volume into its own list (made on first Detect); a list of
        another volume is never written."""
        volume = params.inputVolume
        if volume is None:
            raise ValueError("no input radiograph selected")
        target = self.shown_landmarks(params) or volume_landmarks(self.logic.scene, volume)
        anatomy = None if params.anatomy in ("", ANATOMY_OWN) else params.anatomy
        node = self.logic.detect(volume, model=params.model, markups_node=target,
                                 slice_index=self.slice_index(params), device=device(params),
                                 anatomy=anatomy)
        if params.landmarks is not node:
            params.landmarks = node
        return node

    def export(self, params: Any, report: bool = False) -> tuple[Path, str]:
        """Export the case, then refit the site layer from every case of the export folder and
        switch to the adapted model; returns the case folder and the status line."""
        node = self.shown_landmarks(params)
        if node is None:
            raise ValueError("no landmarks of this volume to export: click Detect first")
        if str(params.exportFolder) in ("", "."):  # an emptied path field reads back as "."
            raise ValueError("choose an export folder first")
        case = self.logic.export(params.inputVolume, node, params.exportFolder, case_id=params.caseId or None,
                                 slice_index=self.slice_index(params), report=report)
        labels = [node.GetNthControlPointLabel(i) for i in range(node.GetNumberOfControlPoints())]
        adapted = self.logic.adapt_to_exports(params.exportFolder, params.model, labels)
        if adapted is None:
            return case, f"Exported {case}"
        params.model = str(adapted.card)
        return case, f"Exported {case}; {adapted_text(adapted)}"

    def set_spacing(self, params: Any, text: str, source: str = "user") -> float:
        """The pixel spacing the user typed (mm per pixel)."""
        try:
            mm = float(str(text).replace(",", "."))
        except ValueError:
            raise ValueError(f"pixel spacing {text!r} is not a number (mm per pixel)") from None
        set_volume_spacing(self.logic.scene, params.inputVolume, mm, source)
        return mm

    def calibrate(self, params: Any, ruler: Any, distance_text: str) -> float:
        """Spacing from a ruler: ``ruler`` is a markups node whose first two points the user put
        on two marks of the radiograph's ruler ``distance_text`` mm apart."""
        if ruler is None or ruler.GetNumberOfDefinedControlPoints() < 2:
            raise ValueError("place two points on the ruler of the radiograph first")
        try:
            distance = float(str(distance_text).replace(",", "."))
        except ValueError:
            raise ValueError(f"ruler distance {distance_text!r} is not a number of mm") from None
        mm = ruler_spacing(params.inputVolume, ruler.GetNthControlPointPosition(0),
                           ruler.GetNthControlPointPosition(1), distance)
        set_volume_spacing(self.logic.scene, params.inputVolume, mm,
                           f"ruler: {distance:g} mm over two points")
        return mm


def model_choices() -> list[tuple[str, str]]:
    """(name, label) of each model asked for by name: local ones, then the model index's, with
    what they detect and whether a first use downloads them."""
    from .cards import ALIASES, local_model, model_names, read_card
    from .catalog import cached_card, read_index

    index, choices = read_index(), []
    for name in model_names():
        entry = index.get(name)
        folder = local_model(name)
        if folder is not None:
            card = read_card(folder / "model.json")
            where = f"{len(card['landmarks'])} landmarks on {card.get('anatomy', 'a radiograph')}"
        else:
            size = "" if cached_card(entry) else f"; downloaded once, {entry['size'] / 1e6:.0f} MB"
            where = entry["detects"] + size
        default = " (default)" if name == ALIASES["default"] else ""
        choices.append((name, f"{name}{default}: {where}"))
    return choices


def detected_text(node: Any) -> str:
    """The status line after Detect."""
    return f"{node.GetNumberOfControlPoints()} landmarks; drag to correct.{rechecked_note(node)}"


def adapted_text(adapted: Any) -> str:
    """What an Export says of the adapted model (``logic.adapt_to_exports``: a ``SiteFit``)."""
    cases, scale = adapted.cases, adapted.scale
    text = f"the model is adapted to {cases} case{'' if cases == 1 else 's'} of this site"
    if adapted.withheld:
        text += " (no offsets applied yet: the corrections do not repeat from case to case)"
    return text + (f"; confidence lowered to this site's errors (x{scale:.2f} wider)" if scale > 1.0 else "")


def device(params: Any) -> str | None:
    return None if params.device == "auto" else params.device


def _rows(node: Any) -> list[dict[str, Any]]:
    rows = table_rows(node)
    for row in rows:
        row["state"] = "missing" if row["missing"] else "verified" if row["corrected"] else ""
        row["doubtful"] = row["confidence"] < LOW_CONFIDENCE and not row["corrected"]
    return rows


def finetune_outcome(result: dict[str, Any], ask: bool = True) -> tuple[str, str]:
    """What the panel says when a fine-tune ends: (kind, text), kind one of "error",
    "question" (offer the new model; without ``ask``, a page that cannot ask: "info" without
    the question), "info" or "" (nothing to say: cancelled)."""
    status = result["status"]
    if status == "failed":
        return "error", "Fine-tuning failed:\n" + "\n".join(result["log_tail"])
    if status == "rejected":
        return "info", (f"The fine-tuned model was worse on held-back cases (MRE "
                        f"{result['mre_after_mm']:.2f} vs {result['mre_before_mm']:.2f} mm, more than the "
                        f"check's noise of {result.get('noise_mm', 0.0):.2f} mm); the current model is kept.")
    if status == "accepted":
        within = result["mre_after_mm"] > result["mre_before_mm"]
        noise = (f"; the difference is within the check's noise of {result['noise_mm']:.2f} mm" if within else "")
        text, question = (f"Fine-tuned model: MRE {result['mre_after_mm']:.2f} mm on held-back cases "
                          f"(was {result['mre_before_mm']:.2f} mm{noise})."), "Use it?"
    elif status == "unvalidated":
        reason = result.get("reason") or "no case could be held back for a check"
        text, question = f"The fine-tuned model could not be checked: {reason}.", "Use it anyway?"
    else:
        return "", ""
    return ("question", f"{text} {question}") if ask else ("info", text)
