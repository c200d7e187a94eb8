"""Streaming batch detection: images are read by DataLoader workers while the model runs.

Memory stays bounded (at most ``workers * prefetch`` decoded images wait in the queue) and a
bad file only costs its own result: the worker hands back the error instead of raising.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .imageio import ImageError, Radiograph, read_image


@dataclass
class Item:
    path: Path
    image: Radiograph | None = None
    error: str | None = None


class ImageStream(torch.utils.data.Dataset):
    """Reads one image per index; returns an `Item` carrying the image or the error message."""

    def __init__(self, paths: Sequence[Path], **read_kwargs: Any) -> None:
        self.paths, self.read_kwargs = list(paths), read_kwargs

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Item:
        path = self.paths[i]
        try:
            return Item(path, image=read_image(path, **self.read_kwargs))
        except (ImageError, OSError, MemoryError) as err:
            return Item(path, error=str(err))


def _single(items: list[Item]) -> Item:
    return items[0]


def _loader(paths: Sequence[Path], workers: int, prefetch: int, read_kwargs: dict[str, Any]
            ) -> Iterator[Item]:
    return iter(torch.utils.data.DataLoader(
        ImageStream(paths, **read_kwargs), batch_size=1, collate_fn=_single, num_workers=workers,
        prefetch_factor=prefetch if workers > 0 else None))


def stream_images(paths: Sequence[Path], workers: int = 1, prefetch: int = 2,
                  **read_kwargs: Any) -> Iterator[Item]:
    """Yield an `Item` per path, in order; ``workers`` > 0 reads in background processes.

    If a worker dies (a decoder crashing on a hostile file), the next pending file is re-read
    alone in a fresh worker: a second crash blames that file, otherwise the stream goes on.
    """
    paths, start = list(paths), 0
    while start < len(paths):
        try:
            for item in _loader(paths[start:], workers, prefetch, read_kwargs):
                start += 1
                yield item
        except RuntimeError as err:
            if workers == 0 or "exited unexpectedly" not in str(err):
                raise
            try:
                item = next(_loader(paths[start:start + 1], 1, 1, read_kwargs))
            except RuntimeError:
                item = Item(paths[start], error=f"{paths[start]}: the image reader crashed on this file")
            start += 1
            yield item


SUFFIXES = {"mrk.json": ".mrk.json", "fcsv": ".fcsv", "csv": ".csv", "png": ".overlay.png",
            "analysis": ".analysis.csv"}  # output format -> file name ending


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
            writers = {"mrk.json": lambda p: write_markups(p, lm, name=name),
                       "fcsv": lambda p: write_fcsv(p, lm),
                       "csv": lambda p: write_csv(p, lm),
                       "png": lambda p: write_overlay(p, image, lm),
                       "analysis": lambda p: write_analysis(p, lm, image.spacing)}
            written = [writers[f](p) for f, p in zip(formats, outputs_for(out_dir, name, formats))]
            if not image.spacing_known and read_kwargs.get("spacing") is None:
                say(f"warning: {path}: the file has no pixel spacing; positions use 1 mm/pixel "
                    f"(give --spacing)", True)
            say(f"{path}: {len(lm)} landmarks -> {', '.join(str(w) for w in written)}", False)
        except (ImageError, OSError) as err:
            failures += 1
            say(f"error: {err}", True)
    return failures
