"""Issue 27: 5-fold cross-validation of the patch stage over ISBI 001-150 (senior annotations).

    python bench/crossval_patch.py ../shared/data/isbi2015-ceph runs/cv-patch [VARIANT ...] [--threads=N] [--ref=VARIANT]
                                   [--coarse-cv=runs/cv-coarse/base] [--folds=K|i,j,...]

Each variant (`VARIANTS`: overrides of recipe v2) trains a patch net from scratch on four folds
of 30 images (001-030, 031-060, ...) and is scored on the fifth, fold by fold and variant by
variant in turn (so that an interrupted run still compares variants on the same folds). Scores:
MRE / SDR 2 mm in mm of the patch stage alone, started

- ``annotation``: on the annotated point (what the patch net adds or loses by itself);
- ``start``: 1.2 mm (per axis) from it, seeded per image and landmark: a coarse stage's error;
- ``coarse``: on the whole-image stage's point of the shipped ``ceph-isbi2015`` (trained on
  001-140, so in-sample for most folds: an optimistic start, with the coarse stage's real error
  pattern);
- ``scanner``: as ``start``, on the held-out images put through the proxy site's simulated
  scanner change (bench/proxy_site.py: 0.13 mm/pixel, exposure curve, blur, noise, JPEG);
- ``train``: as ``start``, on the first 15 training images of the fold (the fit diagnosis);
- ``coarse_scaled``: the ``coarse`` error of each point scaled so that its mean is the whole-image
  stage's validation MRE (1.44 mm, round 4): the real error pattern at its out-of-sample size.
- ``coarse_oos_raw`` / ``coarse_oos_ema`` (with ``--coarse-cv``): on the points of the fold's own
  whole-image net from bench/crossval_coarse.py, trained on the same four folds: the pipeline's
  real out-of-sample start, so this condition is the cross-validated error of the whole pipeline.

A variant with ``"after": V`` trains a *context* net (the wide stage before the patch stage,
`TrainConfig.context_*`) and is scored as that net followed by variant V's patch net of the fold.

Resumable: a finished fold is kept in OUT/<variant>/f<k>/result.json and an unfinished one
continues from its checkpoint. Prints, and writes to OUT/summary.json, the mean over folds with
the fold-to-fold standard deviation, and each variant's paired difference from ``base`` (or ``--ref``).
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MedSapiensLandmarks"))
from MedSapiensLandmarksLib.backends import TorchBackend  # noqa: E402
from MedSapiensLandmarksLib.datasets import read_landmark_csv  # noqa: E402
from MedSapiensLandmarksLib.detector import Detector  # noqa: E402
from MedSapiensLandmarksLib.imageio import read_image  # noqa: E402
from MedSapiensLandmarksLib.landmarks import CEPH_19  # noqa: E402
from MedSapiensLandmarksLib.metrics import radial_errors  # noqa: E402
from MedSapiensLandmarksLib.model import LandmarkNet  # noqa: E402
from MedSapiensLandmarksLib.training import PatchSet, image_box, load_gray, net_specs, recipe, run_stage  # noqa: E402

from proxy_site import SPACING_IN, SPACING_OUT, simulate, to_new_pixels  # noqa: E402

FOLDS, START_MM, TRAIN_SCORED, COARSE_VAL_MM = 5, 1.2, 15, 1.44
CONDITIONS = ("annotation", "start", "coarse", "scanner", "train", "coarse_scaled", "coarse_oos_raw", "coarse_oos_ema")
VARIANTS: dict[str, dict] = {
    "base": {},  # the shipped patch stage of recipe v2 (25 epochs)
    "aug": {"patch_scale": 0.2, "patch_rotation": 15.0, "patch_site_shift": 0.3},
    "long": {"refine_epochs": 100},  # the fit-first schedule: 4x base
    "hires": {"refine_size": (128, 128)},  # the same 6 % patch at twice the resolution (0.11 mm/pixel)
    "jitter": {"refine_jitter": 0.12},  # patch-centre jitter nearer the whole-image stage's error
    "jitter08": {"refine_jitter": 0.08},  # around recipe v4's 0.12 (round 10)
    "jitter16": {"refine_jitter": 0.16},
    # 0.08 near the point, and a fifth of the centres 3.6 mm per axis away: the far misses too
    "tail": {"refine_jitter": 0.08, "refine_jitter_tail": (0.2, 0.25)},
    # a context stage (64x64 over 10 %, 0.375 mm/pixel, jitter 3.6 mm per axis) before v4's patch net
    "cascade": {"context_fraction": 0.10, "context_jitter": 0.15, "context_epochs": 25, "after": "jitter"},
}


def starts(xy: np.ndarray, case_id: str, spacing: float) -> np.ndarray:
    """The annotation moved by a seeded Gaussian of START_MM per axis (same for every variant)."""
    rng = np.random.default_rng(int(case_id))
    return xy + rng.normal(0.0, START_MM / spacing, xy.shape)


def scanner(gray: np.ndarray, case_id: str) -> np.ndarray:
    """The proxy site's scanner change applied to one training-set image."""
    return np.asarray(Image.open(io.BytesIO(simulate(gray, int(case_id)))).convert("L"))


def score(det: Detector, grays: list[np.ndarray], truth: np.ndarray, start: np.ndarray, spacing: float) -> dict:
    coarse = det.card["coarse"]["input"]
    pred = np.stack([det._local(g, image_box(g.shape, coarse), s, np.zeros(len(s)), False)[0]
                     for g, s in zip(grays, start)])
    err = radial_errors(pred, truth, np.full(len(pred), spacing))
    return {"mre": float(err.mean()), "sdr2": float((err <= 2.0).mean() * 100)}


def coarse_points(cases: list, out: Path, threads: int) -> np.ndarray:
    """The whole-image stage's points of ``ceph-isbi2015`` on every case (cached in OUT)."""
    path = out / "coarse_points.npy"
    if not path.exists():
        full = Detector.load("ceph-isbi2015", backend="torch", threads=threads)
        det = Detector(full.card, TorchBackend({"coarse": full.nets["coarse"]}, "cpu", threads))
        out.mkdir(parents=True, exist_ok=True)
        np.save(path, np.stack([det.detect(read_image(c.image, spacing=c.spacing)).xy for c in cases]))
    return np.load(path)


def oos_points(coarse_cv: Path | None, k: int, ids: list[str]) -> dict[str, np.ndarray]:
    """Fold k's out-of-sample whole-image points (bench/crossval_coarse.py), per form, if that fold is done."""
    folder = coarse_cv / f"f{k}" if coarse_cv else None
    if folder is None or not (folder / "result.json").exists():
        return {}
    if json.loads((folder / "result.json").read_text())["held_out"] != ids:
        raise ValueError(f"{folder}: its held-out images are not fold {k}'s")
    return {f"coarse_oos_{form}": np.load(path) for form in ("raw", "ema")
            if (path := folder / f"held_points_{form}.npy").exists()}


def run_fold(variant: str, k: int, cases: list, grays: list, coarse: np.ndarray, out: Path, threads: int,
             coarse_cv: Path | None = None) -> dict:
    folder = out / variant / f"f{k}"
    if (folder / "result.json").exists():
        return json.loads((folder / "result.json").read_text())
    overrides = dict(VARIANTS[variant])
    after = overrides.pop("after", None)
    stage = "context" if after else "refine"
    cfg = recipe("v2", **overrides, threads=threads, seed=k)
    size = len(cases) // FOLDS
    held = set(range(k * size, (k + 1) * size))
    train = [i for i in range(len(cases)) if i not in held]
    specs = net_specs(cfg)
    card = {"landmarks": [{"name": n} for n, _ in CEPH_19], "coarse": specs["coarse"], stage: specs[stage]}
    net = LandmarkNet({**specs[stage]["net"], "num_keypoints": len(CEPH_19)})
    data = PatchSet([cases[i] for i in train], [grays[i] for i in train], specs[stage]["input"],
                    specs["coarse"]["input"], cfg, True, stage)
    (folder / "work").mkdir(parents=True, exist_ok=True)

    def log(record: dict) -> None:
        with open(folder / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    epochs = cfg.context_epochs if after else cfg.refine_epochs
    run_stage(stage, net, data, tuple(specs[stage]["input"]["size"][::-1]), cfg, epochs,
              cfg.refine_batch_size, folder / "work", dict, log)
    nets = {stage: net}
    if after:  # the fold's patch net of variant ``after`` (trained first)
        run_fold(after, k, cases, grays, coarse, out, threads, coarse_cv)
        card["refine"] = net_specs(recipe("v2", **VARIANTS[after]))["refine"]
        nets["refine"] = LandmarkNet({**card["refine"]["net"], "num_keypoints": len(CEPH_19)})
        nets["refine"].load_state_dict(torch.load(out / after / f"f{k}" / "work" / "refine.ckpt",
                                                  weights_only=True)["net"])
    det = Detector(card, TorchBackend(nets, "cpu", threads, channels_last=False))
    held_ids = sorted(held)
    truth = np.stack([cases[i].xy for i in held_ids])
    ids = [cases[i].case_id for i in held_ids]
    moved = np.stack([starts(t, c, SPACING_IN) for t, c in zip(truth, ids)])
    shifted = [scanner(grays[i], c) for i, c in zip(held_ids, ids)]
    seen = train[:TRAIN_SCORED]
    seen_truth = np.stack([cases[i].xy for i in seen])
    every = np.stack([c.xy for c in cases])
    factor = COARSE_VAL_MM / radial_errors(coarse, every, np.full(len(cases), SPACING_IN)).mean()
    held_grays = [grays[i] for i in held_ids]
    result = {
        "annotation": score(det, held_grays, truth, truth, SPACING_IN),
        "start": score(det, held_grays, truth, moved, SPACING_IN),
        "coarse": score(det, held_grays, truth, coarse[held_ids], SPACING_IN),
        "scanner": score(det, shifted, to_new_pixels(truth), to_new_pixels(moved), SPACING_OUT),
        "train": score(det, [grays[i] for i in seen], seen_truth,
                       np.stack([starts(t, cases[i].case_id, SPACING_IN) for t, i in zip(seen_truth, seen)]),
                       SPACING_IN),
        "coarse_scaled": score(det, held_grays, truth, truth + factor * (coarse[held_ids] - truth), SPACING_IN),
        **{cond: score(det, held_grays, truth, start, SPACING_IN) for cond, start in oos_points(coarse_cv, k, ids).items()},
        "held_out": ids, "config": VARIANTS[variant], "epochs": epochs, "coarse_factor": float(factor),
    }
    (folder / "result.json").write_text(json.dumps(result, indent=1))
    return result


def summary(out: Path, variants: list[str], ref: str = "base") -> dict:
    table: dict = {}
    for v in variants:
        done = sorted(out.glob(f"{v}/f*/result.json"))
        rows = {p.parent.name: json.loads(p.read_text()) for p in done}
        table[v] = {"folds": sorted(rows)}
        base = {p.parent.name: json.loads(p.read_text()) for p in out.glob(f"{ref}/f*/result.json")}
        for cond in CONDITIONS:
            have = [r for r in rows.values() if cond in r]
            mre = np.array([r[cond]["mre"] for r in have])
            table[v][cond] = {"folds": len(have), "mre": float(mre.mean()) if len(mre) else None,
                              "fold_sd": float(mre.std(ddof=1)) if len(mre) > 1 else None,
                              "sdr2": float(np.mean([r[cond]["sdr2"] for r in have])) if have else None}
            both = sorted(f for f in set(rows) & set(base) if cond in rows[f] and cond in base[f])
            if v != ref and both:
                d = np.array([rows[f][cond]["mre"] - base[f][cond]["mre"] for f in both])
                table[v][cond]["paired_diff"] = float(d.mean())
                table[v][cond]["paired_sd"] = float(d.std(ddof=1)) if len(d) > 1 else None
    (out / "summary.json").write_text(json.dumps(table, indent=1))
    return table


def fold_list(text: str) -> list[int]:
    """``--folds``: a count K (folds 0..K-1) or the fold numbers themselves, comma-separated."""
    return [int(k) for k in text.split(",") if k] if "," in text else list(range(int(text)))


def main(isbi: Path, out: Path, variants: list[str], threads: int, ref: str = "base",
         coarse_cv: Path | None = None, folds: tuple[int, ...] | list[int] = tuple(range(FOLDS))) -> dict:
    cases = sorted(read_landmark_csv(isbi / "train_senior.csv", isbi / "images", spacing=SPACING_IN),
                   key=lambda c: c.case_id)  # the CSV is not in image order
    grays = [load_gray(c) for c in cases]
    coarse = coarse_points(cases, out, threads)
    for k in folds:
        for v in variants:
            run_fold(v, k, cases, grays, coarse, out, threads, coarse_cv)
            print(json.dumps({"variant": v, "fold": k, **summary(out, variants, ref)[v]}), flush=True)
    return summary(out, variants, ref)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    opts = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
    print(json.dumps(main(Path(args[0]), Path(args[1]), args[2:] or list(VARIANTS), int(opts.get("threads", 1)),
                          opts.get("ref", "base"), Path(opts["coarse-cv"]) if "coarse-cv" in opts else None,
                          fold_list(opts.get("folds", str(FOLDS)))), indent=1))
