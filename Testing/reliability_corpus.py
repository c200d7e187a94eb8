"""A corpus of awkward and broken inputs, generated on the fly (never committed).

Each entry: file name, what it is, and the expected outcome of ``detect``: ``"ok"`` or a
piece of the one-line error message.  `python Testing/reliability_corpus.py` prints the
table of `docs/reliability.md` from a real run.
"""
from __future__ import annotations

import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
from PIL import Image


@dataclass
class Entry:
    name: str
    what: str
    expect: str
    make: Callable[[Path, Path], None]  # (target file, a real cephalogram JPEG)


def _small(seed: int = 0) -> np.ndarray:
    """A 240x200 grey test picture (detections on it are meaningless but must be produced)."""
    yy, xx = np.mgrid[0:240, 0:200]
    return (100 + 80 * np.sin(xx / 17.0) * np.cos(yy / 23.0) + seed).clip(0, 255)


def _png_of_size(path: Path, width: int, height: int) -> None:
    """A valid all-black 8-bit PNG streamed row by row (never held in memory)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + tag + data + zlib.crc32(tag + data).to_bytes(4, "big")

    comp, row = zlib.compressobj(9), b"\x00" * (width + 1)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", width.to_bytes(4, "big") + height.to_bytes(4, "big")
                                            + bytes([8, 0, 0, 0, 0])))
        data = b"".join(comp.compress(row * 1000) for _ in range(height // 1000)) + comp.flush()
        f.write(chunk(b"IDAT", data) + chunk(b"IEND", b""))


def _dicom(path: Path, tags: dict[str, str]) -> None:
    img = sitk.GetImageFromArray((_small() * 16).astype(np.uint16))
    for key, value in tags.items():
        img.SetMetaData(key, value)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(path))
    writer.Execute(img)


def _pil(mode: str, dtype=np.uint8, scale: float = 1.0) -> Callable[[Path, Path], None]:
    def make(path: Path, _: Path) -> None:
        a = (_small() * scale).astype(dtype)
        if mode in ("RGB", "RGBA"):
            a = np.dstack([a, a // 2, 255 - a] + ([np.full_like(a, 200)] if mode == "RGBA" else []))
        Image.fromarray(a).save(path)
    return make


def _itk(array: np.ndarray, spacing: tuple[float, ...] | None = None) -> Callable[[Path, Path], None]:
    def make(path: Path, _: Path) -> None:
        img = sitk.GetImageFromArray(array)
        if spacing:
            img.SetSpacing(spacing)
        sitk.WriteImage(img, str(path))
    return make


def _nan_image() -> np.ndarray:
    a = _small().astype(np.float32)
    a[10, 10], a[20, 30] = np.nan, np.inf
    return a


def _volume() -> np.ndarray:
    return np.stack([_small(s) for s in range(4)]).astype(np.int16)


CORPUS = [
    Entry("empty.png", "zero-byte file", "empty file", lambda p, _: p.write_bytes(b"")),
    Entry("truncated.jpg", "JPEG cut at 20 kB", "truncated JPEG",
          lambda p, src: p.write_bytes(src.read_bytes()[:20000])),
    Entry("truncated-png.png", "PNG cut at 20 kB", "not a readable image",
          lambda p, src: p.write_bytes(_png_bytes(src)[:20000])),
    Entry("jpeg-named.tif", "a JPEG with a .tif name", "ok", lambda p, src: shutil.copy(src, p)),
    Entry("text-named.png", "a text file with a .png name", "not a readable image",
          lambda p, _: p.write_text("patient notes, not an image\n" * 20)),
    Entry("rgb.png", "RGB PNG", "ok", _pil("RGB")),
    Entry("rgba.png", "RGBA PNG", "ok", _pil("RGBA")),
    Entry("gray16.png", "16-bit grey PNG", "ok", _pil("I;16", np.uint16, 200.0)),
    Entry("gray16-tiff.tif", "16-bit grey TIFF", "ok", _pil("I;16", np.uint16, 200.0)),
    Entry("gray16-tiff.png", "second input with the same output name", "same output name", _pil("L")),
    Entry("spacing.dcm", "DICOM with Pixel Spacing 0.2\\0.25", "ok",
          lambda p, _: _dicom(p, {"0028|0030": "0.2\\0.25"})),
    Entry("no-spacing.dcm", "DICOM without any pixel spacing", "ok (warning: no pixel spacing)",
          lambda p, _: _dicom(p, {})),
    Entry("imager-spacing.dcm", "DICOM with Imager Pixel Spacing only (radiograph)", "ok",
          lambda p, _: _dicom(p, {"0018|1164": "0.15\\0.15", "0018|1114": "1.1"})),
    Entry("volume.nrrd", "3D NRRD (4 slices), no slice chosen", "choose a slice",
          _itk(_volume(), (0.5, 0.5, 2.0))),
    Entry("one-pixel.png", "1x1 image", "too small", _itk(np.zeros((1, 1), np.uint8))),
    Entry("huge.png", "20000x20000 PNG (valid, 400 Mpixel)", "larger than the supported",
          lambda p, _: _png_of_size(p, 20000, 20000)),
    Entry("nan.nrrd", "float NRRD with NaN and Inf pixels", "NaN or infinite", _itk(_nan_image())),
    Entry("name with spaces.png", "path containing spaces", "ok", _pil("L")),
    Entry("undecodable-\udcff-name.png", "file name with non-UTF-8 bytes", "ok", _pil("L")),
    Entry("missing.png", "file that does not exist", "file not found", lambda p, _: None),
]


def _png_bytes(src: Path) -> bytes:
    import io
    buf = io.BytesIO()
    Image.open(src).convert("L").save(buf, "PNG")
    return buf.getvalue()


def build(folder: Path, ceph_jpeg: Path) -> list[tuple[Entry, Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for entry in CORPUS:
        path = folder / entry.name
        entry.make(path, ceph_jpeg)
        out.append((entry, path))
    return out


if __name__ == "__main__":
    import contextlib
    import io
    import sys
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MedSapiensLandmarks"))
    from MedSapiensLandmarksLib.cli import main

    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2015-ceph" / "images"
    with tempfile.TemporaryDirectory() as tmp:
        items = build(Path(tmp) / "in", shared / "151.jpg")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["detect", *[str(p) for _, p in items], "-o", f"{tmp}/out", "-q"])
        lines = err.getvalue().splitlines()
        print(f"exit code {rc}\n\n| input | what | expected | result |\n|---|---|---|---|")
        for entry, path in items:
            said = [ln.split(": ", 2)[0] + ": " + ln.split(": ", 2)[2] for ln in lines
                    if ln.startswith((f"error: {path}:", f"warning: {path}:"))]
            wrote = sorted(q.name for q in Path(f"{tmp}/out").glob(f"{Path(entry.name).stem}.*"))
            result = "; ".join(s.replace(f"{tmp}/in/", "") for s in said)
            result += ("; written: " + ", ".join(wrote)) if wrote else "; nothing written"
            shown = entry.name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            print(f"| `{shown}` | {entry.what} | {entry.expect} | {result.replace('|', '/')} |")
