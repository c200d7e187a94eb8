"""One-page patient report (PDF, A4): radiograph with tracing, landmarks, analyses, model.

Needs matplotlib (``pip install 'medsapiens-landmarks[report]'``); nothing else.
"""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .atomic import atomic_write
from .cephalometry import TRACING_LINES, cells
from .codec import to_gray, to_uint8_range
from .imageio import Radiograph
from .landmarks import Landmarks
from .markups import LOW_CONFIDENCE

A4_INCHES = (8.27, 11.69)
DISCLAIMER = ("Research use only - not a medical device. Landmarks are placed by a model and must be "
              "checked by a clinician; intervals assume the model's calibrated confidence holds for this image.")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medsapiens-landmarks")
    except PackageNotFoundError:
        return "source tree"


def _table(ax: Any, rows: list[list[str]], head: list[str], widths: list[float], colours: list[str],
           fontsize: float) -> None:
    ax.axis("off")
    if not rows:
        return
    t = ax.table(cellText=rows, colLabels=head, colWidths=widths, loc="upper center", cellLoc="left")
    t.auto_set_font_size(False)
    t.set_fontsize(fontsize)
    t.scale(1.0, 0.95)
    for (r, _c), cell in t.get_celld().items():
        cell.set_linewidth(0.2)
        if r == 0:
            cell.set_facecolor("#dde4ee")
        elif colours[r - 1]:
            cell.get_text().set_color(colours[r - 1])


def render_report(image: Radiograph, lm: Landmarks, corrected: Sequence[bool] | None = None,
                  analyses: list[dict[str, Any]] | None = None, patient: str = "") -> Any:
    """The report as a matplotlib Figure (A4 portrait)."""
    from matplotlib.figure import Figure

    corrected = list(corrected) if corrected is not None else [False] * len(lm)
    fig = Figure(figsize=A4_INCHES)
    fig.text(0.05, 0.965, "Landmark report" + (" - cephalometric analysis" if analyses else ""),
             fontsize=14, weight="bold")
    spacing = f"{image.spacing[0]:.3g} mm/pixel" if image.spacing_known else "pixel spacing unknown"
    fig.text(0.05, 0.947, f"Image {patient or Path(str(lm.meta.get('image', ''))).name} ({spacing}) | "
             f"model {lm.meta.get('model', '?')} | medsapiens-landmarks {_version()} | "
             f"{datetime.date.today().isoformat()}", fontsize=7.5)
    warning = lm.meta.get("plausibility", {}).get("warning")
    if warning:
        fig.text(0.05, 0.93, f"Warning: {warning}", fontsize=7, color="white", wrap=True,
                 bbox={"facecolor": "#aa0000", "edgecolor": "none", "pad": 2})
    gray = to_uint8_range(to_gray(image.pixels), image.pixels.dtype)
    step = max(1, int(np.ceil(max(gray.shape) / 900)))
    ax = fig.add_axes((0.03, 0.50, 0.52, 0.42))
    ax.imshow(gray[::step, ::step], cmap="gray", extent=(-0.5, gray.shape[1] - 0.5, gray.shape[0] - 0.5, -0.5))
    ax.axis("off")
    if analyses:
        for a, b in TRACING_LINES.values():
            if a in lm.names and b in lm.names:  # a line with a missing end is not drawn (NaN)
                p, q = lm.xy[lm.names.index(a)], lm.xy[lm.names.index(b)]
                ax.plot([p[0], q[0]], [p[1], q[1]], color="#3fa7ff", lw=0.6)
    present = np.isfinite(lm.xy).all(1)
    for i, (x, y) in enumerate(lm.xy):
        if not present[i]:  # marked missing by the clinician
            continue
        colour = "#22cc44" if corrected[i] or lm.confidence[i] >= LOW_CONFIDENCE else "#ff3030"
        ax.plot(x, y, "o", ms=3.5, mfc="none", mec=colour, mew=0.9)
        ax.text(x + 25 * step, y, str(i + 1), color=colour, fontsize=5.5)
    rows = [[str(i + 1), lm.names[i], f"{lm.confidence[i]:.2f}",
             "missing" if not present[i] else "yes" if corrected[i] else ""] for i in range(len(lm))]
    colours = ["" if corrected[i] or lm.confidence[i] >= LOW_CONFIDENCE else "#cc0000" for i in range(len(lm))]
    _table(fig.add_axes((0.58, 0.50, 0.39, 0.42)), rows, ["#", "landmark", "confidence", "corrected"],
           [0.1, 0.3, 0.3, 0.3], colours, 6.5 if len(lm) <= 25 else 4.5)
    if analyses:
        fig.text(0.05, 0.485, "Analyses (90 % interval from the points' confidence; orange: the class "
                 "could change within it)", fontsize=7.5)
        _table(fig.add_axes((0.03, 0.065, 0.94, 0.415)), [cells(r) for r in analyses],
               ["measurement", "value", "norm", "class", "90 % interval"], [0.34, 0.12, 0.14, 0.26, 0.14],
               ["#d07000" if r["uncertain"] else "" for r in analyses], 6.0)
    fig.text(0.05, 0.02, DISCLAIMER, fontsize=6.5, style="italic", wrap=True)
    return fig


def write_patient_report(path: str | Path, image: Radiograph, lm: Landmarks,
                         corrected: Sequence[bool] | None = None,
                         analyses: list[dict[str, Any]] | None = None, patient: str = "") -> Path:
    fig = render_report(image, lm, corrected, analyses, patient)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="pdf")
    return Path(path)
