"""Browser front end on trame-slicer: upload, detect, drag-correct, export, fine-tune.

The page holds one Slicer slice view (rendered by slicer-core on the server, streamed by
trame-rca) and a side panel.  All the work is done by the module's own `LandmarksLogic`
on the trame-slicer scene, exactly as in desktop Slicer. One process serves one browser
session (`python -m MedSapiensLandmarksLib.web`, started by the `gateway`).
"""
from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import vtk

from .cards import ALIASES
from .detector import Detector
from .export import ExportError
from .gateway import MAX_UPLOAD_BYTES, SECRET_ENV, exit_with_parent, guard_worker
from .imageio import ImageError, Radiograph, SliceNeeded, read_image
from .inputs import IMAGE_SUFFIXES
from .logic import FinetuneJob, LandmarksLogic
from .cephalometry import cells
from .mrml import ATTR_SPACING, ijk_to_ras, plausibility_warning, rechecked_note, spacing_text, table_rows
from .panel import PanelController, adapted_text, finetune_outcome, model_choices

_SAFE_NAME = re.compile(r"[^\W_][\w .()+-]{0,150}")  # letters of any script, no separators


class ModelDownload:
    """A model of the index fetched in a thread; the page's poll reads its progress."""

    def __init__(self, model: str) -> None:
        self.model, self.done, self.total, self.error, self.finished = model, 0, 0, "", False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        from .cards import resolve

        try:
            resolve(self.model, progress=self._progress)
        except Exception as err:  # noqa: BLE001 - a full disk too: never reported as a success
            self.error = str(err) or repr(err)
        finally:
            self.finished = True

    def _progress(self, done: int, total: int) -> None:
        self.done, self.total = done, total

    def status(self) -> str:
        total = f" of {self.total / 1e6:.1f}" if self.total else ""
        return f"downloading {self.model} (once): {self.done / 1e6:.1f}{total} MB"


class UploadError(ValueError):
    """An uploaded file that is refused before it touches the disk."""


def safe_upload_name(name: str) -> str:
    """The file name of an upload, refused when it is a path, hidden, or not an image type."""
    if "/" in name or "\\" in name or not _SAFE_NAME.fullmatch(name):
        raise UploadError(f"{name!r}: refused file name (a plain file name: no folders, no hidden files)")
    if Path(name).suffix.lower() not in IMAGE_SUFFIXES:  # the rule `detect` uses on folders
        raise UploadError(f"{name!r}: not an image type ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return name


def gray_volume_file(image: Radiograph, folder: Path) -> Path:
    """The radiograph as a grey one-slice NRRD with its geometry, for Slicer to load."""
    import SimpleITK as sitk

    from .codec import to_gray
    from .export import radiograph_to_itk

    gray = Radiograph(np.asarray(to_gray(image.pixels), dtype=np.float32), image.pixel_to_lps,
                      image.spacing_known, image.path)
    path = folder / (Path(image.path).name.split(".")[0] + ".nrrd")
    sitk.WriteImage(radiograph_to_itk(gray), str(path), useCompression=True)
    return path


class LandmarksWebApp:
    """trame server + slicer-core scene + the module logic."""

    def __init__(self, server: Any = None, export_dir: str | Path = "medsapiens-cases",
                 model: str = "default", uploads: str | Path | None = None,
                 detector: Detector | None = None, anatomy: str | None = None) -> None:
        from trame.app import get_server
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories
        from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

        self.server = get_server(server, client_type="vue3")
        self.slicer = SlicerApp()
        register_rca_factories(self.slicer.view_manager, self.server)
        self.layouts = LayoutManager(self.slicer.scene, self.slicer.view_manager, self.server)
        self.layouts.register_layout_dict(
            {"slice": Layout(LayoutDirection.Vertical, [ViewLayoutDefinition.axial_view()])})
        self.logic = LandmarksLogic(self.slicer.scene)
        self.panel = PanelController(self.logic)  # the Slicer panel's rules: spacing, ruler
        self.ruler: Any = None
        self.anatomy = anatomy
        model = ALIASES.get(model, model)  # "default" is listed by its name
        if detector is not None:
            self.logic.add_detector(model, detector, anatomy=anatomy)
        self.model, self.export_dir = model, Path(export_dir).resolve()
        self.uploads = Path(uploads) if uploads else Path(tempfile.mkdtemp(prefix="medsapiens-web-"))
        self.uploads.mkdir(parents=True, exist_ok=True)
        self.volume: Any = None
        self.volume_dir: Path | None = None
        self.markups: Any = None
        self.job: FinetuneJob | None = None
        self.download: ModelDownload | None = None
        self.pending: Path | None = None  # a 3D upload waiting for its slice choice
        state = self.server.state
        state.update({"status": "Open a radiograph (PNG, JPEG, DICOM, NRRD…)",
                      "error": "", "rows": [], "case_id": "", "can_detect": False, "can_export": False,
                      "finetune_progress": 0, "finetune_running": False, "points_view": [], "spacing": "",
                      "warning": "", "measurements": [], "tracing": False, "report": False,
                      "spacing_info": "", "ruler_mm": "10", "has_ruler": False, "model": model,
                      "models": [{"title": label, "value": name} for name, label in model_choices()],
                      "downloading": False, "slices": 0, "slice_index": 0})
        state.change("model")(self.on_model)
        state.change("tracing")(lambda **_: self.refresh())
        self._build_ui()
        self.layouts.set_layout("slice")

    # -- actions -----------------------------------------------------------------------------
    async def http_upload(self, request: Any) -> Any:
        """``POST /upload?name=<file name>``: the page's file, streamed to disk with the size limit
        enforced while reading (nothing of it is held in memory), then opened."""
        from aiohttp import web

        part: Path | None = None
        try:
            name = safe_upload_name(request.query.get("name", ""))
            too_big = UploadError(f"{name}: larger than {MAX_UPLOAD_BYTES // 2**20} MB")
            if (request.content_length or 0) > MAX_UPLOAD_BYTES:
                raise too_big
            part = self.uploads / f".{name}.part"
            size = 0
            with open(part, "wb") as out:
                async for chunk in request.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    if size > MAX_UPLOAD_BYTES:
                        raise too_big
                    out.write(chunk)
            path = self.uploads / name
            os.replace(part, path)
            part = None
            self.open_upload(path)
        except UploadError as err:
            self._error(str(err))
            return web.Response(status=413 if "larger than" in str(err) else 400, text=self._public(str(err)))
        finally:
            if part is not None:
                part.unlink(missing_ok=True)
        return web.Response(text="ok")

    def open_upload(self, path: Path) -> None:
        """Show an uploaded file; a 3D volume waits for its slice choice, a refused file is deleted."""
        try:
            self.load(path)
        except SliceNeeded as err:  # a 3D volume: the page offers the slice choice
            self.pending = path
            with self.server.state as s:
                s.slices, s.slice_index = err.slices, err.slices // 2
                s.error = ""
                s.status = f"{path.name}: a 3D volume of {err.slices} slices: choose the slice to detect on"
        except ImageError as err:
            path.unlink(missing_ok=True)  # a refused upload does not wait for the session's end
            self._error(str(err))

    def on_model(self, model: str = "", **_: Any) -> None:
        """Another model by name; one that no folder holds is downloaded first, in the background."""
        from .cards import needs_download

        if not model or model == self.model or self.download is not None:
            return
        if needs_download(model) is None:
            self.model = model
            self.server.state.status = f"model: {model}"
            return
        self.download = ModelDownload(model)
        with self.server.state as s:
            s.downloading, s.status = True, self.download.status()

    def load_slice(self) -> None:
        """The chosen slice of the 3D volume uploaded last."""
        if self.pending is None:
            return self._error("upload a 3D volume first")
        try:
            self.load(self.pending, int(self.server.state.slice_index))
        except (ImageError, ValueError) as err:
            return self._error(str(err))
        with self.server.state as s:
            s.slices = 0

    def load(self, path: str | Path, slice_index: int | None = None) -> None:
        """Show an image file (a 3D volume: one of its slices) in the slice view."""
        text = str(self.server.state.spacing or "").strip()
        try:
            spacing = float(text) if text else None
        except ValueError:
            raise ImageError(f"pixel spacing {text!r} is not a number (mm per pixel)") from None
        image = read_image(path, spacing=spacing, slice_index=slice_index)
        # Its own folder: Slicer's archetype reader takes numbered files of one folder
        # (151.nrrd, 152.nrrd) for a series, and the second image of a session failed to load.
        folder = Path(tempfile.mkdtemp(prefix="volume-", dir=self.uploads))
        volume_file = gray_volume_file(image, folder)
        self.slicer.scene.Clear()
        self.logic.cleanup()
        self.volume = self.slicer.io_manager.load_volumes([str(volume_file)])[0]
        self.volume.SetName(Path(path).name.split(".")[0])
        # the NRRD carries 1 mm/pixel for a file without spacing: keep saying it is unknown
        self.volume.SetAttribute(ATTR_SPACING, json.dumps({"known": image.spacing_known,
                                                           "source": image.spacing_source}))
        self.markups = self.ruler = None
        if self.volume_dir is not None:  # the previous image's converted volume
            shutil.rmtree(self.volume_dir, ignore_errors=True)
        self.volume_dir = folder
        self.slicer.display_manager.show_volume(self.volume, do_reset_views=True)
        with self.server.state as s:
            s.can_detect, s.can_export, s.rows, s.error = True, False, [], ""
            s.warning, s.measurements, s.has_ruler = "", [], False
            s.spacing_info = spacing_text(self.volume)
            s.case_id = self.volume.GetName()
            s.status = f"{Path(path).name}: {image.shape[1]}x{image.shape[0]} pixels, {spacing_text(self.volume)}"

    def detect(self) -> None:
        if self.volume is None:
            return self._error("open an image first")
        new = self.markups is None
        self.markups = self.logic.detect(self.volume, self.model, markups_node=self.markups,
                                         anatomy=self.anatomy)
        if new:  # re-detection reuses the node: one observer per node
            self.markups.AddObserver(self.markups.PointEndInteractionEvent, lambda *_: self.refresh())
        self.refresh()
        n = self.markups.GetNumberOfControlPoints()
        self.server.state.status = f"{n} landmarks detected.{rechecked_note(self.markups)}"

    def _params(self) -> SimpleNamespace:
        """The page's state in the shape `PanelController` reads (the Slicer parameter node's)."""
        return SimpleNamespace(inputVolume=self.volume, landmarks=self.markups, sliceIndex=0)

    def set_spacing(self) -> None:
        """Apply the typed spacing to the open image (points stay on their pixels)."""
        if self.volume is None:
            return self._error("open an image first")
        try:
            self.panel.set_spacing(self._params(), str(self.server.state.spacing or ""))
        except ValueError as err:
            return self._error(str(err))
        self._spacing_changed()

    def add_ruler(self) -> None:
        """A two-point line across the middle of the image, to drag onto two ruler marks."""
        if self.volume is None:
            return self._error("open an image first")
        if self.ruler is None:
            image = self.volume.GetImageData()
            w, h, _ = image.GetDimensions()
            m = ijk_to_ras(self.volume)
            self.ruler = self.slicer.scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", "Ruler")
            self.ruler.CreateDefaultDisplayNodes()
            for j in (h / 3, 2 * h / 3):
                self.ruler.AddControlPoint(vtk.vtkVector3d(*(m @ [w / 2, j, 0, 1])[:3]))
        self.server.state.has_ruler = True
        self.server.state.status = "drag the two ruler points onto two marks, type their distance, Calibrate"

    def calibrate(self) -> None:
        try:
            self.panel.calibrate(self._params(), self.ruler, str(self.server.state.ruler_mm or ""))
        except ValueError as err:
            return self._error(str(err))
        self._spacing_changed()

    def _spacing_changed(self) -> None:
        with self.server.state as s:
            s.spacing_info, s.error = spacing_text(self.volume), ""
        self.refresh()

    def refresh(self) -> None:
        """Table rows, the on-screen position of each point (the page and its tests use them),
        the plausibility warning, the measurements and the tracing lines."""
        if self.markups is None:
            return
        rows = table_rows(self.markups)
        for r in rows:
            r["confidence"] = round(float(r["confidence"]), 3)
            r["position"] = [round(v, 2) for v in self.markups.GetNthControlPointPosition(r["index"])]
        analyses = self.logic.measurements(self.volume, self.markups)
        if analyses:
            self.logic.tracing(self.markups, bool(self.server.state.tracing))
        with self.server.state as s:
            s.rows, s.can_export, s.error = rows, True, ""
            s.points_view = self.points_in_view()
            s.warning = plausibility_warning(self.markups)
            s.measurements = [dict(zip(("name", "value", "norm", "class", "interval"), cells(a)),
                                   uncertain=a["uncertain"]) for a in analyses]

    def points_in_view(self) -> list[list[float]]:
        """Each point in the slice view's pixel frame (x right, y down), or [] if no view yet."""
        views = self.slicer.view_manager.get_slice_views()
        if not views or self.markups is None:
            return []
        node = self.slicer.scene.GetNodeByID(views[0].get_view_node_id())
        xy_to_ras = np.array([[node.GetXYToRAS().GetElement(i, j) for j in range(4)] for i in range(4)])
        ras_to_xy = np.linalg.inv(xy_to_ras)
        height = node.GetDimensions()[1]
        out = []
        for i in range(self.markups.GetNumberOfControlPoints()):
            x, y, _z, _w = ras_to_xy @ [*self.markups.GetNthControlPointPosition(i), 1.0]
            out.append([round(float(x), 1), round(float(height - 1 - y), 1)])
        return out

    def export(self, report: bool = False) -> None:
        """Export the case; ``report`` comes with the click (the checkbox's value in the page)."""
        if self.volume is None or self.markups is None:
            return self._error("detect landmarks first")
        try:
            case = self.logic.export(self.volume, self.markups, self.export_dir,
                                     case_id=self.server.state.case_id or None,
                                     report=bool(report))
        except ExportError as err:
            return self._error(str(err))
        status = f"exported {case.name}"
        labels = [self.markups.GetNthControlPointLabel(i) for i in range(self.markups.GetNumberOfControlPoints())]
        adapted = self.logic.adapt_to_exports(self.export_dir, self.model, labels)  # the site's convention
        if adapted is not None:
            self.model = str(adapted.card)
            status += f"; {adapted_text(adapted)}"
        with self.server.state as s:
            s.status, s.error = status, ""

    def finetune(self) -> None:
        if not (self.export_dir / "dataset.json").exists():
            return self._error("export at least one case first")
        if self.job is not None:
            return self._error("a fine-tune of this session is already running: wait for its result")
        stamp = time.strftime("%Y%m%d-%H%M%S")  # one folder per job: a model in use is never rewritten
        self.job = FinetuneJob(self.export_dir, self.export_dir.parent / f"{self.export_dir.name}-models" / stamp,
                               init=self.model)
        self.server.state.finetune_running = True
        self.server.state.status = "fine-tuning…"

    def poll(self) -> None:
        """Called every second by the page: download and fine-tuning progress and result."""
        if self.download is not None:
            self._poll_download()
        if self.job is None:
            return
        with self.server.state as s:
            s.finetune_progress = round(100 * self.job.progress)
            if not self.job.running:
                res = self.job.result()
                s.finetune_running = False
                _kind, text = finetune_outcome(res, ask=False)  # the panel's words
                s.status = (f"fine-tuned model: {res['model']} ({res['status']}): {text}"
                            if res["returncode"] == 0 else "fine-tuning failed: " + " ".join(res["log_tail"]))
                self.job = None

    def shutdown(self) -> None:
        """The session ends: a running fine-tune is stopped and its unfinished folder removed."""
        job, self.job = self.job, None
        if job is not None and job.running:
            job.cancel(wait=True)
            if not (job.out_dir / "model.json").exists():
                shutil.rmtree(job.out_dir, ignore_errors=True)

    def _poll_download(self) -> None:
        download = self.download
        with self.server.state as s:
            s.status = download.status()
            if download.finished:
                self.download, s.downloading = None, False
                if download.error:
                    s.model, s.error = self.model, self._public(download.error)
                    s.status = f"model: {self.model} (the download failed)"
                else:
                    self.model, s.error = download.model, ""
                    s.status = f"model: {download.model} (downloaded and checked)"

    def _start_polling(self, **_: Any) -> None:
        import asyncio

        async def every_second() -> None:
            while True:
                await asyncio.sleep(1.0)
                self.poll()
        asyncio.get_event_loop().create_task(every_second())

    def _error(self, message: str) -> None:
        with self.server.state as s:
            s.error = self._public(message)

    def _public(self, message: str) -> str:
        """A message for the page: the server's own folders are not shown."""
        for folder, name in ((self.export_dir, "the export folder"), (self.uploads, "the upload")):
            message = message.replace(str(folder), name)
        return message

    # -- page --------------------------------------------------------------------------------
    def _build_ui(self) -> None:
        from trame.ui.vuetify3 import SinglePageWithDrawerLayout
        from trame.widgets import html
        from trame.widgets import vuetify3 as v

        ctrl = self.server.controller
        ctrl.detect, ctrl.export, ctrl.finetune = self.detect, self.export, self.finetune
        ctrl.set_spacing, ctrl.add_ruler, ctrl.calibrate = self.set_spacing, self.add_ruler, self.calibrate
        ctrl.load_slice = self.load_slice
        ctrl.on_server_ready.add(self._start_polling)
        with SinglePageWithDrawerLayout(self.server) as self.ui:
            self.ui.title.set_text("MedSapiens Landmarks")
            with self.ui.drawer as drawer:
                drawer.width = 460
                with v.VContainer(classes="pa-3"):
                    # The file goes by HTTP POST, streamed to disk (not through the WebSocket's state);
                    # templates may not name `window`, the event's document reaches it.
                    html.Input(type="file", id="upload", accept=",".join(sorted(IMAGE_SUFFIXES)), classes="mb-2",
                               change=("(f => f && $event.target.ownerDocument.defaultView.fetch("
                                       "'upload?name=' + encodeURIComponent(f.name), {method: 'POST', body: f})"
                                       ".finally(() => { $event.target.value = '' }))($event.target.files[0])"))
                    with html.Div(v_if=("slices > 1",), classes="d-flex align-center", id="slice-choice"):
                        v.VSlider(v_model=("slice_index",), min=0, max=("slices - 1",), step=1, label="Slice",
                                  thumb_label=True, density="compact", hide_details=True, id="slice")
                        v.VBtn("Load slice", id="load-slice", click=ctrl.load_slice, size="small", classes="ml-2")
                    with html.Div(classes="d-flex"):
                        v.VTextField(v_model=("spacing",), label="Pixel spacing (mm) for files without one",
                                     density="compact", id="spacing", placeholder="e.g. 0.1")
                        v.VBtn("Set", id="set-spacing", click=ctrl.set_spacing, disabled=("!can_detect",),
                               classes="ml-2")
                    html.Div("{{ spacing_info }}", id="spacing-info", classes="text-caption mb-1")
                    with html.Div(classes="d-flex mb-2"):
                        v.VBtn("Ruler", id="ruler-add", click=ctrl.add_ruler, disabled=("!can_detect",),
                               size="small")
                        v.VTextField(v_model=("ruler_mm",), label="ruler distance (mm)", density="compact",
                                     id="ruler-mm", classes="mx-2", hide_details=True)
                        v.VBtn("Calibrate", id="calibrate", click=ctrl.calibrate, disabled=("!has_ruler",),
                               size="small")
                    v.VSelect(v_model=("model",), items=("models",), label="Model", density="compact",
                              id="model", disabled=("downloading",), hide_details=True, classes="mb-2")
                    v.VBtn("Detect landmarks", id="detect", click=ctrl.detect,
                           disabled=("!can_detect || downloading",),
                           color="primary", block=True, classes="mb-2")
                    html.Div("{{ status }}", id="status", classes="text-caption mb-1")
                    v.VAlert(v_if=("error",), text=("error",), type="error", density="compact", id="error")
                    v.VAlert(v_if=("warning",), text=("'Warning: ' + warning",), type="warning",
                             density="compact", id="plausibility")
                    with v.VTable(density="compact", id="landmarks", height=420, fixed_header=True):
                        with html.Thead():
                            with html.Tr():
                                for head in ("#", "name", "confidence", "corrected"):
                                    html.Th(head)
                        with html.Tbody():
                            with html.Tr(v_for="r in rows", key="r.index",
                                         style=("r.corrected ? 'color: #2e7d32' : r.confidence < 0.5 ? "
                                                "'color: #ff5252' : ''",)):
                                html.Td("{{ r.index + 1 }}")
                                html.Td("{{ r.name }}", classes="name")
                                html.Td("{{ r.confidence.toFixed(2) }}")
                                html.Td("{{ r.corrected ? 'verified' : '' }}", classes="corrected")
                    v.VCheckbox(v_if=("measurements.length",), v_model=("tracing",), label="Show tracing lines",
                                density="compact", hide_details=True, id="tracing")
                    with v.VTable(v_if=("measurements.length",), density="compact", id="measurements",
                                  height=300, fixed_header=True):
                        with html.Thead():
                            with html.Tr():
                                for head in ("measurement", "value", "norm", "class", "90 % interval"):
                                    html.Th(head)
                        with html.Tbody():
                            with html.Tr(v_for="m in measurements", key="m.name",
                                         style=("m.uncertain ? 'color: #e65100' : ''",)):
                                for key in ("name", "value", "norm", "class", "interval"):
                                    html.Td(f"{{{{ m.{key} }}}}", classes=key)
                    v.VTextField(v_model=("case_id",), label="Case id", density="compact", classes="mt-2")
                    v.VCheckbox(v_model=("report",), label="Also write a patient report (PDF)", density="compact",
                                hide_details=True, id="report")
                    v.VBtn("Export", id="export", click=(ctrl.export, "[report]"), disabled=("!can_export",),
                           block=True, classes="mb-2")
                    v.VBtn("Fine-tune", id="finetune", click=ctrl.finetune, disabled=("finetune_running",),
                           block=True)
                    v.VProgressLinear(v_if=("finetune_running",), model_value=("finetune_progress",))
            with self.ui.content:
                with html.Div(classes="fill-height d-flex flex-row flex-grow-1", id="view"):
                    self.layouts.initialize_layout_grid(self.ui)


def main(argv: list[str] | None = None) -> None:
    """One session's worker: the app on 127.0.0.1 (the gateway proxies to it)."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m MedSapiensLandmarksLib.web")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--export-dir", required=True)
    p.add_argument("--upload-dir", required=True)
    p.add_argument("--model", default="default")
    p.add_argument("--anatomy", default=None, help="official multi-dataset checkpoints: head|chest|hand|leg")
    p.add_argument("--idle-timeout", type=int, default=300, help="exit after this long without a page")
    args = p.parse_args(argv)
    secret = os.environ.pop(SECRET_ENV, "")
    if not secret:
        sys.exit("error: a session worker is started by `medsapiens-landmarks serve`, with its secret")
    sys.argv = sys.argv[:1]  # trame parses the command line too: give it none of ours
    # The model (and torch, for torch models) is loaded before trame and VTK: importing torch
    # after them crashed the process (triton's import, seen with slicer-core 5.11 + torch 2.14).
    official = {"anatomy": args.anatomy} if args.anatomy else {}
    detector = Detector.load(args.model, **official)
    app = LandmarksWebApp(export_dir=args.export_dir, model=args.model, uploads=args.upload_dir,
                          detector=detector, anatomy=args.anatomy)

    def bind(wslink: Any) -> None:
        guard_worker(wslink.app, secret)
        wslink.app.router.add_post("/upload", app.http_upload)
    app.server.controller.on_server_bind.add(bind)

    def leave() -> None:  # the session ends: its fine-tune stops, its patient's files go
        app.shutdown()
        shutil.rmtree(args.upload_dir, ignore_errors=True)
    exit_with_parent(leave)
    atexit.register(leave)  # the idle timeout's exit too
    app.server.start(host="127.0.0.1", port=args.port, open_browser=False, timeout=args.idle_timeout,
                     show_connection_info=False)


if __name__ == "__main__":
    main()
