"""Stress table: MRE of models on cephalograms changed as another site's would be.

    python bench/stress.py CSV IDS MODEL [MODEL ...] [--parts] [--split S] [--no-recheck]
    (IDS: comma list, or "all")

Changes (each alone): pixel size 0.13 mm (the image resampled, spacing set to match), a 12 %
collimation border, gamma 0.6 and 1.6, contrast halved, Gaussian noise (sigma 12 grey levels),
JPEG quality 20, a burned-in text block and ruler. ``--parts``: instead, each part of the proxy
site's scanner change (bench/proxy_site.py) alone, then all of them. Prints a markdown table (MRE
in mm). A hand CSV (37 landmarks; ``--split valid``) is scored in mm by the 50 mm wrist width.
``--no-recheck``: also a column per model without the shape re-check of gross errors.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MedSapiensLandmarks"))
from MedSapiensLandmarksLib.datasets import read_landmark_csv  # noqa: E402
from MedSapiensLandmarksLib.detector import Detector  # noqa: E402
from MedSapiensLandmarksLib.imageio import Radiograph, read_image  # noqa: E402
from MedSapiensLandmarksLib.metrics import hand_scale  # noqa: E402

from proxy_site import BLUR, CONTRAST, GAMMA, NOISE, OFFSET, QUALITY, SPACING_IN, SPACING_OUT, simulate  # noqa: E402


def _plain(g: np.ndarray, spacing: float = 0.1, scale: float = 1.0) -> Radiograph:
    a = np.array([[spacing, 0, 0], [0, spacing, 0], [0, 0, 0.0]])
    return Radiograph(np.clip(g, 0, 255).astype(np.uint8), a, True), scale


def changes(g: np.ndarray, rng: np.random.Generator) -> dict:
    h, w = g.shape
    f = g.astype(np.float32)
    out = {"original": _plain(f)}
    s = 0.1 / 0.13
    small = np.asarray(Image.fromarray(g).resize((round(w * s), round(h * s)), Image.BILINEAR), np.float32)
    out["pixel size 0.13 mm"] = _plain(small, 0.13, s)
    c = f.copy()
    c[: int(0.12 * h)], c[:, : int(0.12 * w)] = 0, 0
    out["collimation border 12 %"] = _plain(c)
    out["gamma 0.6"] = _plain(255 * (f / 255) ** 0.6)
    out["gamma 1.6"] = _plain(255 * (f / 255) ** 1.6)
    out["contrast x0.5"] = _plain(128 + 0.5 * (f - 128))
    out["noise sigma 12"] = _plain(f + rng.normal(0, 12, f.shape))
    out["JPEG quality 20"] = _plain(_jpeg(f, 20))
    m = f.copy()
    m[int(0.05 * h):int(0.09 * h), int(0.55 * w):int(0.9 * w)] = 250  # text block
    m[int(0.2 * h):int(0.7 * h), int(0.93 * w):int(0.95 * w)] = 245  # ruler
    out["burned-in text + ruler"] = _plain(m)
    return out


def _jpeg(g: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.round(g), 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf), np.float32)


def proxy_parts(g: np.ndarray, seed: int) -> dict:
    """Each part of the proxy site's scanner change alone, then the whole change."""
    h, w = g.shape
    f = g.astype(np.float32)
    s = SPACING_IN / SPACING_OUT
    small = Image.fromarray(g).resize((round(w * s), round(h * s)), Image.LANCZOS)
    return {"original": _plain(f),
            f"resampled to {SPACING_OUT} mm (Lanczos)": _plain(np.asarray(small, np.float32), SPACING_OUT, s),
            f"blur sigma {BLUR} px": _plain(np.asarray(Image.fromarray(g).filter(ImageFilter.GaussianBlur(BLUR)),
                                                        np.float32)),
            f"gamma {GAMMA}, contrast x{CONTRAST} +{OFFSET:g}": _plain(255 * (f / 255) ** GAMMA * CONTRAST + OFFSET),
            f"noise sigma {NOISE:g}": _plain(f + np.random.default_rng(seed).normal(0, NOISE, f.shape)),
            f"JPEG quality {QUALITY}": _plain(_jpeg(f, QUALITY)),
            "the whole change": _plain(np.asarray(Image.open(io.BytesIO(simulate(g, seed))), np.float32),
                                       SPACING_OUT, s)}


def main(csv_path: str, ids: str, *models: str) -> None:
    parts, plain = "--parts" in models, "--no-recheck" in models
    split = next((models[i + 1] for i, m in enumerate(models) if m == "--split"), None)
    models = tuple(m for m in models if m not in ("--parts", "--no-recheck", "--split", split))
    cases = [c for c in read_landmark_csv(csv_path, spacing=0.1) if split is None or c.split == split]
    if ids != "all":
        wanted = ids.split(",")
        cases = [c for c in cases if c.case_id in wanted]
    dets = {m: Detector.load(m) for m in models}
    if plain:
        dets.update({f"{m} (no re-check)": Detector(dets[m].card, dets[m].backend, recheck=False) for m in models})
        models = tuple(dets)
    errors: dict[tuple[str, str], list[float]] = {}
    for case in cases:
        g = read_image(case.image, spacing=0.1).pixels
        g = g[..., 0] if g.ndim == 3 else g
        g = np.clip(g, 0, 255).astype(np.uint8)
        made = proxy_parts(g, int(case.case_id)) if parts else changes(g, np.random.default_rng(int(case.case_id)))
        for name, (image, scale) in made.items():
            truth = (case.xy + 0.5) * scale - 0.5  # pixel-centre convention of the resampling
            mm = hand_scale(truth[None])[0] if len(truth) == 37 else image.spacing[0]
            for m, det in dets.items():
                lm = det.detect(image)
                err = np.linalg.norm(lm.xy - truth, axis=1) * mm
                errors.setdefault((name, m), []).extend(err.tolist())
    names = list(dict.fromkeys(n for n, _ in errors))
    print(f"{len(cases)} images of {csv_path}; MRE mm\n")
    print("| change | " + " | ".join(models) + " |")
    print("|---|" + "---|" * len(models))
    for n in names:
        print(f"| {n} | " + " | ".join(f"{np.mean(errors[(n, m)]):.3f}" for m in models) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:])
