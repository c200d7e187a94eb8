"""Streaming batch detection: images are read by worker processes while the model runs.

Memory stays bounded (at most ``workers * prefetch`` decoded images wait in the queue) and a
bad file only costs its own result: the worker hands back the error instead of raising, and
a worker that dies (a decoder crashing in native code) costs only the file it was reading.
No torch: the standard library's process pool does the reading.
"""
from __future__ import annotations

import csv
import io
import multiprocessing
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .imageio import ImageError, Radiograph, read_image
from .shape import rechecked_text


@dataclass
class Item:
    path: Path
    image: Radiograph | None = None
    error: str | None = None


def read_item(path: Path, read_kwargs: dict[str, Any]) -> Item:
    """One image, or the reason it cannot be read."""
    try:
        return Item(path, image=read_image(path, **read_kwargs))
    except (ImageError, OSError, MemoryError) as err:
        return Item(path, error=str(err))


def _pool(workers: int) -> ProcessPoolExecutor:
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


def _alone(path: Path, read_kwargs: dict[str, Any]) -> Item:
    """Re-read one file in a fresh worker: a second crash blames that file."""
    with _pool(1) as pool:
        try:
            return pool.submit(read_item, path, read_kwargs).result()
        except BrokenProcessPool:
            return Item(path, error=f"{path}: the image reader crashed on this file")


def stream_images(paths: Sequence[Path], workers: int = 1, prefetch: int = 2,
                  **read_kwargs: Any) -> Iterator[Item]:
    """Yield an `Item` per path, in order; ``workers`` > 0 reads in background processes."""
    paths = list(paths)
    if workers == 0:
        yield from (read_item(p, read_kwargs) for p in paths)
        return
    start = 0
    while start < len(paths):
        pool = _pool(workers)
        queue: deque[Future] = deque()
        nxt = start
        try:
            while start < len(paths):
                try:
                    while nxt < len(paths) and len(queue) < workers * prefetch:
                        queue.append(pool.submit(read_item, paths[nxt], read_kwargs))
                        nxt += 1
                    item = queue[0].result()
                except BrokenProcessPool:  # a worker died: retry this file alone, then go on
                    item = _alone(paths[start], read_kwargs)
                    start += 1
                    yield item
                    break
                queue.popleft()
                start += 1
                yield item
        finally:
            for f in queue:
                f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)


SUFFIXES = {"mrk.json": ".mrk.json", "fcsv": ".fcsv", "csv": ".csv", "png": ".overlay.png",
            "analysis": ".analysis.csv", "measurements": ".measurements.csv",
            "report": ".report.pdf"}  # output format -> file name ending
COHORT_TABLE = "measurements.csv"  # every image's measurements row, refreshed after each run


def outputs_for(out_dir: Path, stem: str, formats: Sequence[str]) -> list[Path]:
    """The files ``detect`` writes for one case."""
    return [out_dir / f"{stem}{SUFFIXES[f]}" for f in formats]


def pending(paths: Sequence[Path], stem: Callable[[Path], str], out_dir: Path,
            formats: Sequence[str]) -> list[Path]:
    """Inputs whose outputs are not all on disk yet (resuming an interrupted batch)."""
    return [p for p in paths if not all(f.exists() for f in outputs_for(out_dir, stem(p), formats))]


def detect_files(det: Any, paths: Sequence[Path], out_dir: Path, formats: Sequence[str],
                 stem: Callable[[Path], str], workers: int, say: Callable[[str, bool], None],
                 tick: Callable[[], Any] = lambda: None, **read_kwargs: Any) -> int:
    """Detect on every file and write the chosen formats; returns the number of failures.

    ``say(message, problem)`` reports each result, warning and error (one line each).
    """
    from .analysis import write_analysis
    from .cephalometry import analyse_landmarks
    from .markups import write_csv, write_fcsv, write_markups
    from .overlay import write_overlay

    failures = 0
    for item in stream_images(paths, workers, **read_kwargs):
        tick()
        path, image = item.path, item.image
        try:
            if image is None:
                raise ImageError(item.error)
            lm = det.detect(image)
            name = stem(path)
            analyses = analyse_landmarks(image, lm) if {"measurements", "report"} & set(formats) else None
            writers = {"mrk.json": lambda p: write_markups(p, lm, name=name),
                       "fcsv": lambda p: write_fcsv(p, lm),
                       "csv": lambda p: write_csv(p, lm),
                       "png": lambda p: write_overlay(p, image, lm),
                       "analysis": lambda p: write_analysis(p, lm, image.spacing),
                       "measurements": lambda p: write_measurements(p, name, lm, analyses or []),
                       "report": lambda p: _report(p, image, lm, analyses)}
            written = [writers[f](p) for f, p in zip(formats, outputs_for(out_dir, name, formats))]
            verdict = lm.meta.get("plausibility")
            if verdict and not verdict["plausible"]:
                say(f"warning: {path}: {verdict['warning']}", True)
            if verdict and verdict.get("rechecked"):
                say(f"note: {path}: {rechecked_text(verdict['rechecked'])}", True)
            if not image.spacing_known and read_kwargs.get("spacing") is None:
                say(f"warning: {path}: the file has no pixel spacing; positions use 1 mm/pixel "
                    f"(give --spacing)", True)
            say(f"{path}: {len(lm)} landmarks -> {', '.join(str(w) for w in written)}", False)
        except (ImageError, OSError) as err:
            failures += 1
            say(f"error: {err}", True)
    if "measurements" in formats:
        collect_measurements(out_dir)
    return failures


def _report(path: Path, image: Radiograph, lm: Any, analyses: Any) -> Path:
    from .patient_report import write_patient_report

    return write_patient_report(path, image, lm, analyses=analyses)


def write_measurements(path: Path, name: str, lm: Any, analyses: list[dict[str, Any]]) -> Path:
    """One image's row of the cohort table (with its header)."""
    from .cephalometry import csv_row
    from .markups import write_text

    verdict = lm.meta.get("plausibility", {})
    row = {"image": name, "model": lm.meta.get("model", ""),
           "plausible": "" if not verdict else "1" if verdict["plausible"] else "0", **csv_row(analyses)}
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=list(row), lineterminator="\n")
    w.writeheader()
    w.writerow(row)
    return write_text(path, out.getvalue())


def collect_measurements(out_dir: Path) -> Path:
    """``measurements.csv``: the rows of every ``*.measurements.csv`` of the folder, by image."""
    from .markups import write_text

    rows: list[dict[str, str]] = []
    for f in sorted(out_dir.glob(f"*{SUFFIXES['measurements']}")):
        with open(f, newline="", encoding="utf-8") as fh:
            rows.extend(csv.DictReader(fh))
    fields = list(dict.fromkeys(k for r in rows for k in r))
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=fields, lineterminator="\n", restval="")
    w.writeheader()
    w.writerows(rows)
    return write_text(out_dir / COHORT_TABLE, out.getvalue())
