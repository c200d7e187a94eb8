"""Fine-tune recipe of the Slicer/web Fine-tune button, measured on a new-site proxy.

The junior annotations of ISBI 2015 stand in for a new clinic's convention: the shipped model
(trained on the senior annotations) is fine-tuned on the junior labels of the first 10 / 25
training images and scored against the junior labels of training images 126-150, which the
fine-tuning never sees. Test1/test2 are not used (no choice is made on them).

    python bench/finetune_recipe.py ../shared/data/isbi2015-ceph runs/finetune-recipe

prints one JSON line per run and a markdown table at the end.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

RECIPES = [(5, 3), (20, 10)]  # (coarse epochs, refine epochs)
SIZES = [10, 25]
SCORED = [f"{i:03d}" for i in range(126, 151)]


def cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "MedSapiensLandmarksLib.cli", *args], check=True,
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1] / "MedSapiensLandmarks")
    return out.stdout


def evaluate(model: str, csv_path: Path, images: Path, work: Path) -> float:
    report = work / f"eval-{abs(hash(model))}.json"
    cli("evaluate", str(csv_path), "--images", str(images), "--model", model, "--json", str(report), "--threads", "1")
    return json.loads(report.read_text())["overall"]["mre_mm"]


def main(data: str, work: str) -> None:
    data, work = Path(data).resolve(), Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    with open(data / "train_junior.csv", newline="") as f:
        rows = list(csv.reader(f))
    scored = work / "junior_126-150.csv"
    with open(scored, "w", newline="") as f:
        csv.writer(f).writerows([rows[0]] + [r for r in rows[1:] if Path(r[0]).stem in SCORED])
    results = [{"cases": 0, "recipe": "shipped model", "mre_mm": evaluate("default", scored, data / "images", work)}]
    print(json.dumps(results[0]), flush=True)
    for n in SIZES:
        ids = ",".join(f"{i:03d}" for i in range(1, n + 1))
        for coarse, refine in RECIPES:
            out = work / f"ft-{n}-{coarse}-{refine}"
            t0 = time.time()
            cli("train", "--csv", str(data / "train_junior.csv"), "--spacing", "0.1", "--ids", ids,
                "--val-count", "0", "--init", "default", "--coarse-epochs", str(coarse),
                "--refine-epochs", str(refine), "--threads", "1", "-o", str(out))
            seconds = time.time() - t0
            res = {"cases": n, "recipe": f"{coarse}+{refine}", "train_s": round(seconds, 1),
                   "mre_mm": evaluate(str(out), scored, data / "images", work)}
            results.append(res)
            print(json.dumps(res), flush=True)
    base = results[0]["mre_mm"]
    print("\n| cases | recipe (coarse+refine epochs) | train wall time | MRE vs junior, 126-150 (mm) | gain |")
    print("|---|---|---|---|---|")
    for r in results:
        t = f"{r['train_s'] / 60:.1f} min" if "train_s" in r else ""
        print(f"| {r['cases']} | {r['recipe']} | {t} | {r['mre_mm']:.3f} | {base - r['mre_mm']:+.3f} |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
