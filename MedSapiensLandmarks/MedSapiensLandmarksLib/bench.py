"""Timing of the detection pipeline, stage by stage, against the raw network forward (floor)."""
from __future__ import annotations

import datetime
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .backends import default_threads
from .detector import Detector
from .imageio import read_image
from .markups import write_markups
from .overlay import write_overlay


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def raw_forward_seconds(det: Detector, repeat: int) -> float:
    """The floor: every network forward that detection runs, alone, on inputs of the model's
    size: coarse (a batch of 2 when the mirror orientation is checked, x2 with a flip test)
    + one batch per local stage."""
    inputs = {}
    for stage in det.backend.stages:
        spec = det.card[stage]["input"]
        batch = len(det.names) if stage != "coarse" else 2 if spec.get("orientation") == "auto" else 1
        batch *= 2 if spec.get("flip_test") else 1
        inputs[stage] = np.zeros((batch, spec.get("channels", 1), *spec["size"]), dtype=np.float32)

    def run() -> None:
        for stage, x in inputs.items():
            det.backend.run(stage, x)
    run()
    return _median_time(run, repeat)


def sapiens_random(arch: str = "sapiens_0.3b", device: str = "cpu") -> Detector:
    """A Sapiens detector with random weights, built as an official checkpoint would be."""
    import torch

    from .backends import TorchBackend
    from .landmarks import CEPH_19
    from .model import LandmarkNet
    from .official import INPUT_SIZE, sapiens_card

    torch.manual_seed(0)
    net = LandmarkNet({"family": "sapiens", "arch": arch, "input_size": list(INPUT_SIZE),
                       "num_keypoints": len(CEPH_19)})
    card = sapiens_card(net, CEPH_19, f"{arch} (random weights)", "random")
    return Detector(card, TorchBackend({"coarse": net}, device))


def bench_image(image_path: str | Path, model: str = "default", spacing: float | None = 0.1,
                repeat: int = 5, threads: int | None = None, det: Detector | None = None,
                backend: str | None = None) -> dict[str, Any]:
    """Median seconds of each stage of ``detect`` on one image, end to end to .mrk.json + PNG."""
    det = det or Detector.load(model, device="cpu", threads=threads, backend=backend)
    image = read_image(image_path, spacing=spacing)
    det.detect(image)  # warm-up
    stages: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as out:
        for _ in range(repeat):
            t0 = time.perf_counter()
            image = read_image(image_path, spacing=spacing)
            t1 = time.perf_counter()
            lm = det.detect(image)
            t2 = time.perf_counter()
            write_markups(Path(out) / "a.mrk.json", lm)
            t3 = time.perf_counter()
            write_overlay(Path(out) / "a.png", image, lm)
            t4 = time.perf_counter()
            laps = {"read": t1 - t0, **det.timings, "write_mrk": t3 - t2}
            # time of this run that no stage's lap holds (medians of parts need not add up)
            laps["unaccounted"] = t3 - t0 - sum(laps.values())
            laps.update(write_png=t4 - t3, end_to_end_mrk=t3 - t0, end_to_end_mrk_png=t4 - t0)
            for k, v in laps.items():
                stages.setdefault(k, []).append(v)
    med = {k: statistics.median(v) for k, v in stages.items()}
    floor = raw_forward_seconds(det, repeat)
    return {"model": det.card.get("name", model), "image": str(image_path), "repeat": repeat,
            "threads": threads or default_threads(), "backend": det.backend.name,
            "cpu": platform.processor() or platform.machine(), "stages_s": med,
            "raw_forward_s": floor, "overhead": med["end_to_end_mrk"] / floor,
            "peak_rss_mb": peak_rss_mb()}


def bench_batch(folder: str | Path, model: str = "default", count: int = 20, spacing: float | None = 0.1,
                workers: int = 1, formats: tuple[str, ...] = ("mrk.json",), threads: int | None = None,
                backend: str | None = None) -> dict[str, Any]:
    """Throughput of the streaming batch path (`detect` over a folder) on ``count`` images."""
    from .batch import detect_files
    from .inputs import case_stem, expand_inputs

    det = Detector.load(model, device="cpu", threads=threads, backend=backend)
    files = expand_inputs([str(folder)])[:count]
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        failures = detect_files(det, files, Path(out), formats, case_stem, workers,
                                lambda *_: None, spacing=spacing)
        seconds = time.perf_counter() - t0
    return {"images": len(files), "failures": failures, "seconds": seconds,
            "images_per_s": len(files) / seconds, "workers": workers, "formats": list(formats),
            "threads": threads or default_threads(), "backend": det.backend.name,
            "peak_rss_mb": peak_rss_mb()}


def markdown(results: dict[str, dict[str, Any]], command: str) -> str:
    """A dated section for docs/benchmarks.md: machine, backend, threads, one table per run."""
    first = next(iter(results.values()))
    lines = [f"### bench run {datetime.date.today().isoformat()} ({os.cpu_count()} CPUs, "
             f"{platform.machine()}, {first.get('backend')} backend, {first.get('threads')} threads)", "",
             f"Command: `{command}`", ""]
    for label, res in results.items():
        if "stages_s" in res:
            lines += [f"{res['model']}:", "", "| stage | ms |", "|---|---|"]
            lines += [f"| {k} | {v * 1000:.1f} |" for k, v in res["stages_s"].items()]
            lines += [f"| raw forward floor | {res['raw_forward_s'] * 1000:.1f} |", "",
                      f"Overhead {res['overhead']:.2f}x, peak RSS {res['peak_rss_mb']:.0f} MB.", ""]
        else:
            lines += [f"{label}: {res['images']} images, {res['images_per_s']:.2f} images/s "
                      f"({res['workers']} reader workers, {', '.join(res['formats'])}).", ""]
    return "\n".join(lines) + "\n"
