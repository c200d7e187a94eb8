"""Markdown evaluation report: tables, error histogram, per-landmark box plot, worst cases."""
from __future__ import annotations

import datetime
import json
from pathlib import Path

import numpy as np

from .evaluation import Evaluation
from .imageio import read_image
from .landmarks import Landmarks
from .overlay import write_overlay


def _figures(ev: Evaluation, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(ev.errors.ravel(), bins=np.arange(0, max(10.0, float(ev.errors.max())) + 0.25, 0.25))
    for r in ev.radii:
        ax.axvline(r, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="radial error (mm)", ylabel="landmarks", title=f"Error histogram ({ev.errors.size} points)")
    fig.tight_layout()
    fig.savefig(out / "error_histogram.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(max(7, 0.4 * len(ev.names)), 4))
    ax.boxplot([ev.errors[:, k] for k in range(len(ev.names))], showfliers=True)
    ax.set_xticks(range(1, len(ev.names) + 1), ev.names, rotation=90 if len(ev.names) > 20 else 0)
    ax.set(ylabel="radial error (mm)", title="Error per landmark")
    fig.tight_layout()
    fig.savefig(out / "landmark_boxplot.png", dpi=110)
    plt.close(fig)
    bins = ev.calibration["bins"]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfect calibration")
    ax.plot([b[0] for b in bins], [b[1] for b in bins], "o-", label="this model")
    for p, h, n in bins:
        ax.annotate(str(n), (p, h), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (mean of bin)", ylabel="share within 2 mm",
           title=f"Reliability (ECE {ev.calibration['ece_2mm']:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=110)
    plt.close(fig)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def write_report(ev: Evaluation, out_dir: str | Path, source: str, worst: int = 5) -> Path:
    """Write ``report.md`` + figures + overlays of the ``worst`` cases into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _figures(ev, out)
    radii = [f"SDR {r:g} mm (%)" for r in ev.radii]

    def row(name: str, s: dict[str, float]) -> list[str]:
        return [name, f"{s['mre_mm']:.3f}", f"{s['sd_mm']:.2f}", *(f"{s[f'sdr_{r:g}mm']:.1f}" for r in ev.radii)]

    lines = [f"# Evaluation of `{ev.model}`", "",
             f"{len(ev.cases)} images from `{source}`, {len(ev.names)} landmarks, "
             f"{ev.seconds_per_image:.2f} s/image, written {datetime.date.today().isoformat()}.", "",
             "## Accuracy", ""]
    lines += _table(["landmark", "MRE (mm)", "SD (mm)", *radii],
                    [row(n, s) for n, s in ev.per_landmark.items()] + [row("**all**", ev.overall)])
    rk = ev.ranking
    lines += ["", "![error histogram](error_histogram.png)", "", "![per-landmark errors](landmark_boxplot.png)",
              "", "## Confidence", "",
              f"Spearman correlation of confidence and error: {rk['spearman']:.3f} (negative = "
              f"confident points are the accurate ones). MRE of the {rk['fraction']:.0%} least-confident "
              f"points {rk['mre_least_confident_mm']:.3f} mm, of the rest {rk['mre_rest_mm']:.3f} mm.", ""]
    cal = ev.calibration
    lines += [f"Calibration against \"within 2 mm\": expected calibration error {cal['ece_2mm']:.3f}. The red "
              f"flag (confidence < 0.5) marks {cal['flagged_pct']:.1f} % of the points and catches "
              f"{cal['caught_pct']:.1f} % of the {cal['errors_over_radius']} errors > 2 mm.", "",
              "![reliability diagram](reliability.png)", ""]
    if ev.classes:
        lines += ["## Cephalometric classification (ISBI 2015 measurements)", "",
                  "Class from predicted landmarks vs class from annotated landmarks.", ""]
        lines += _table(["measurement", "agreement (%)", "mean |difference|"],
                        [[k, f"{v['accuracy_pct']:.1f}", f"{v['mean_abs_diff']:.2f}"]
                         for k, v in ev.classes.items() if isinstance(v, dict)])
        lines += ["", f"Average agreement: {ev.classes['average_accuracy_pct']:.1f} %.", ""]
    if ev.analyses:
        lines += ["## Analyses", "", "Class from predicted vs annotated landmarks, and the share of images whose "
                  "annotated value lies in the predicted 90 % interval.", ""]

        def pct(v: float | None) -> str:
            return "" if v is None else f"{v:.1f}"
        lines += _table(["measurement", "agreement (%)", "mean abs. difference", "interval coverage (%)"],
                        [[k, pct(v["agreement_pct"]), f"{v['mean_abs_diff']:.2f}", pct(v["interval_coverage_pct"])]
                         for k, v in ev.analyses["per_measurement"].items()]
                        + [[f"**{k}**", pct(v["agreement_pct"]), "", pct(v["interval_coverage_pct"])]
                           for k, v in ev.analyses["per_analysis"].items()])
        lines += [""]
    order = np.argsort(-ev.errors.mean(1))[:worst]
    lines += ["## Worst cases", "", "Rings: prediction (red = low confidence); cyan crosses: annotation.", ""]
    for rank, i in enumerate(order, start=1):
        case = ev.cases[i]
        image = read_image(case.image, spacing=case.spacing)
        lm = Landmarks(ev.names, ev.names, ev.pred[i], image.to_lps(ev.pred[i]), ev.confidence[i])
        name = f"worst-{rank}-{case.case_id}.png"
        write_overlay(out / name, image, lm, truth=ev.truth[i])
        k = int(np.argmax(ev.errors[i]))
        lines += [f"{rank}. `{case.case_id}`: MRE {ev.errors[i].mean():.2f} mm, largest {ev.names[k]} "
                  f"{ev.errors[i, k]:.2f} mm", "", f"   ![{case.case_id}]({name})", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "evaluation.json").write_text(json.dumps(ev.to_json(), indent=1) + "\n")
    return out / "report.md"
