"""Cold start of the CLI: whole-process wall time and peak RSS of `detect` on one image.

    python bench/cold_start.py IMAGE MODEL [--backend onnx|torch] [--repeat 3]

Each run is a fresh interpreter (imports, model load, one detection, .mrk.json + overlay);
prints the median wall time and the largest peak RSS over the runs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


def run_once(cmd: list[str]) -> tuple[float, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()}")
    return wall, usage.ru_maxrss / 1024.0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("image")
    p.add_argument("model")
    p.add_argument("--backend", default=None)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    walls, rss = [], []
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "MedSapiensLandmarksLib.cli", "detect", args.image, "-o", out,
               "--spacing", "0.1", "--model", args.model, "--format", "mrk.json,png"]
        cmd += ["--backend", args.backend] if args.backend else []
        for _ in range(args.repeat):
            w, r = run_once(cmd)
            walls.append(w)
            rss.append(r)
    print(f"{args.model} ({args.backend or 'default'} backend): cold detect median {statistics.median(walls):.2f} s "
          f"over {args.repeat} runs ({', '.join(f'{w:.2f}' for w in walls)}), peak RSS {max(rss):.0f} MB")


if __name__ == "__main__":
    main()
