"""Read radiographs (PNG/JPEG/TIFF/BMP, DICOM, NRRD, NIfTI, MHA) with their geometry.

Geometry is kept as a 3x3 matrix mapping homogeneous pixel coordinates (x = column, y = row, 1)
to LPS millimetres, so points land on the image in Slicer whatever the spacing, origin,
direction or slice.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

if TYPE_CHECKING:
    import SimpleITK as sitk  # imported where a file is read: the GPU training path runs without it

# Formats whose files carry no physical spacing (SimpleITK reports 1.0).
PLAIN_FORMATS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
MAX_PIXELS = 100_000_000  # per slice
MAX_VOXELS = 400_000_000  # a whole file (all slices and colour components), before decoding
SPACING_RANGE_MM = (0.01, 10.0)  # what a pixel of a radiograph can measure
# File signatures -> ITK reader, for files whose extension does not match their content.
MAGIC = [(b"\xff\xd8\xff", "JPEGImageIO"), (b"\x89PNG\r\n\x1a\n", "PNGImageIO"),
         (b"II*\x00", "TIFFImageIO"), (b"MM\x00*", "TIFFImageIO"), (b"BM", "BMPImageIO")]
# Pixel Spacing, Imager Pixel Spacing, Estimated Radiographic Magnification Factor (ITK's keys)
DICOM_SPACING_TAGS = ("0028|0030", "0018|1164", "0018|1114")


class ImageError(ValueError):
    """An input image that cannot be used; the message names the file and the problem."""


class SliceNeeded(ImageError):
    """A 3D volume read without a slice choice; ``slices`` along the k axis to choose from."""

    def __init__(self, message: str, slices: int) -> None:
        super().__init__(message)
        self.slices = slices


@dataclass
class Radiograph:
    pixels: np.ndarray  # (H, W) or (H, W, C), dtype of the file
    pixel_to_lps: np.ndarray  # (3, 3): LPS = A @ [x, y, 1]
    spacing_known: bool
    path: str = ""
    spacing_source: str = ""  # where the spacing came from ("file header", "DICOM Pixel Spacing", "user"...)

    @property
    def shape(self) -> tuple[int, int]:
        return self.pixels.shape[0], self.pixels.shape[1]

    @property
    def spacing(self) -> tuple[float, float]:
        """mm per pixel along x (columns) and y (rows)."""
        return (float(np.linalg.norm(self.pixel_to_lps[:, 0])),
                float(np.linalg.norm(self.pixel_to_lps[:, 1])))

    def to_lps(self, xy: np.ndarray) -> np.ndarray:
        xy = np.asarray(xy, dtype=np.float64)
        return np.c_[xy, np.ones(len(xy))] @ self.pixel_to_lps.T

    def to_pixels(self, lps: np.ndarray) -> np.ndarray:
        """Inverse of `to_lps` for points on the image plane (least squares off-plane)."""
        a = self.pixel_to_lps
        lps = np.asarray(lps, float).reshape(-1, 3)
        out = np.full((len(lps), 2), np.nan)
        ok = np.isfinite(lps).all(1)  # NaN rows: points marked missing stay missing
        sol, *_ = np.linalg.lstsq(a[:, :2], (lps[ok] - a[:, 2]).T, rcond=None)
        out[ok] = sol.T
        return out

    def with_spacing(self, spacing: float | tuple[float, float]) -> "Radiograph":
        """Same image with the in-plane pixel size replaced (directions kept)."""
        sx, sy = (spacing, spacing) if np.isscalar(spacing) else spacing
        check_spacing(sx), check_spacing(sy)
        a = self.pixel_to_lps.copy()
        a[:, 0] *= sx / np.linalg.norm(a[:, 0])
        a[:, 1] *= sy / np.linalg.norm(a[:, 1])
        return Radiograph(self.pixels, a, True, self.path, "user")


def check_spacing(mm: float) -> float:
    """A pixel spacing a radiograph can have: finite, 0.01 to 10 mm (ImageError otherwise; a
    huge value hangs ITK's resampling, NaN would be written as 1 mm)."""
    try:
        value = float(mm)
    except (TypeError, ValueError):
        raise ImageError(f"pixel spacing {mm!r} is not a number (mm per pixel)") from None
    if not (SPACING_RANGE_MM[0] <= value <= SPACING_RANGE_MM[1]):  # False for NaN
        raise ImageError(f"pixel spacing {mm!r} mm is outside {SPACING_RANGE_MM[0]:g}-{SPACING_RANGE_MM[1]:g} mm "
                         f"per pixel")
    return value


def read_image(path: str | Path, spacing: float | None = None, slice_index: int | None = None,
               axis: int = 2) -> Radiograph:
    """Read a 2D radiograph, or one slice (index along ``axis`` 0/1/2 = i/j/k) of a 3D volume."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, not an image")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    head, tail = _ends(path)
    io = next((name for magic, name in MAGIC if head.startswith(magic)), None)
    if io == "JPEGImageIO" and b"\xff\xd9" not in tail:
        raise ImageError(f"{path}: truncated JPEG (no end-of-image marker)")
    with _itk_name(path) as name:
        reader, img = _read(path, name, io)
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(img)  # (H, W[, C]) or (D, H, W[, C])
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ImageError(f"{path}: {int((~np.isfinite(arr)).sum())} pixels are NaN or infinite")
    dim = img.GetDimension()
    sp, org = np.array(img.GetSpacing(), float), np.array(img.GetOrigin(), float)
    spacing_known = io is None and path.suffix.lower() not in PLAIN_FORMATS
    source = "file header" if spacing_known else f"none in the {(io or path.suffix[1:]).removesuffix('ImageIO').upper()} file"
    dicom = reader.HasMetaDataKey("0008|0016") or reader.HasMetaDataKey("0002|0010")  # SOP class, syntax
    if dicom:
        tags = [reader.GetMetaData(t) if reader.HasMetaDataKey(t) else "" for t in DICOM_SPACING_TAGS]
        mm, source = dicom_tag_spacing(*tags)
        spacing_known = mm is not None
        if mm is not None and not tags[0]:  # with Pixel Spacing, ITK's own spacing stands
            sp[:2] = mm
    dirm = np.array(img.GetDirection(), float).reshape(dim, dim)
    if dim == 2:
        a = np.zeros((3, 3))
        a[:2] = np.c_[dirm[:, 0] * sp[0], dirm[:, 1] * sp[1], org]
    elif dim == 3:
        arr, a = slice_volume(str(path), arr, dirm * sp, org, slice_index, axis)
    else:
        raise ImageError(f"{path}: {dim}D images are not supported")
    if arr.ndim == 3 and arr.shape[2] not in (1, 3, 4):
        raise ImageError(f"{path}: {arr.shape[2]}-component pixels are not supported")
    if min(arr.shape[:2]) < 8:
        raise ImageError(f"{path}: image of {arr.shape[1]}x{arr.shape[0]} pixels is too small")
    rad = Radiograph(arr, a, spacing_known, str(path), source)
    return rad.with_spacing(spacing) if spacing is not None else rad


def _read(path: Path, name: str, io: str | None) -> tuple[sitk.ImageFileReader, sitk.Image]:
    """Header first (size check before any pixel is decoded), then the pixels."""
    import SimpleITK as sitk

    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        if io is not None:
            reader.SetImageIO(io)  # by content: a JPEG named .tif still reads
        reader.ReadImageInformation()
        size = reader.GetSize()
        if size[0] * size[1] > MAX_PIXELS:
            raise ImageError(f"{path}: image of {'x'.join(map(str, size))} pixels is larger than "
                             f"the supported {MAX_PIXELS:,} pixels per slice")
        voxels = int(np.prod(size, dtype=np.int64)) * reader.GetNumberOfComponents()
        if voxels > MAX_VOXELS:
            raise ImageError(f"{path}: {'x'.join(map(str, size))} voxels ({voxels:,} values) is larger than the "
                             f"supported {MAX_VOXELS:,}: save the slice to detect on as its own file")
        return reader, reader.Execute()
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown error"
        raise ImageError(f"{path}: not a readable image ({first[:200]})") from None


@contextmanager
def _itk_name(path: Path) -> Iterator[str]:
    """``path`` as ITK can open it: file names with undecodable bytes (which make ITK abort
    the process) are reached through a temporary UTF-8 symlink."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        with tempfile.TemporaryDirectory(prefix="medsapiens-") as folder:
            link = os.path.join(folder, "image" + "".join(path.suffixes[-2:]).encode("ascii", "ignore").decode())
            os.symlink(os.fsencode(path.resolve()), link)
            yield link
        return
    yield str(path)


def _ends(path: Path, n: int = 1024) -> tuple[bytes, bytes]:
    with open(path, "rb") as f:
        head = f.read(16)
        f.seek(max(0, path.stat().st_size - n))
        return head, f.read()


def dicom_tag_spacing(pixel: str, imager: str, magnification: str) -> tuple[tuple[float, float] | None, str]:
    """The pixel spacing (columns, rows in mm) a radiograph's DICOM tag values mean, and its
    source: Pixel Spacing (0028,0030), else Imager Pixel Spacing (0018,1164, the detector plane)
    divided by the Estimated Radiographic Magnification Factor (0018,1114) when given; None when
    unknown. Tag values as DICOM writes them (row\\column), "" for an absent tag. Used for files
    (`read_image`) and for volumes Slicer's DICOM module loaded (`mrml.dicom_spacing`)."""
    def columns_rows(text: str) -> tuple[float, float]:
        row, col = (float(v) for v in text.split("\\")[:2])
        return col, row

    try:
        if pixel:
            return columns_rows(pixel), "DICOM Pixel Spacing (0028,0030)"
    except ValueError:
        pass  # unreadable: the Imager Pixel Spacing may still say it
    if not imager:
        return None, "none in the DICOM file (no Pixel Spacing, no Imager Pixel Spacing)"
    try:
        col, row = columns_rows(imager)
        mag = float(magnification) if magnification else None
    except ValueError:
        return None, "none in the DICOM file (unreadable Imager Pixel Spacing)"
    source = "DICOM Imager Pixel Spacing (0018,1164)"
    if mag is not None and mag > 0:
        source += f" / Estimated Radiographic Magnification Factor {mag:g} (0018,1114)"
        col, row = col / mag, row / mag
    return (col, row), source


def slice_volume(name: str, arr: np.ndarray, cols: np.ndarray, org: np.ndarray,
                 slice_index: int | None, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """KJI(C) array + LPS step per index (columns of ``cols``) -> 2D slice and its pixel_to_lps.

    A volume of one slice needs no slice choice; otherwise ``slice_index`` is required.
    """
    depth = arr.shape[0]
    if slice_index is None:
        if depth == 1:
            slice_index, axis = 0, 2
        else:
            raise SliceNeeded(f"{name}: 3D volume ({arr.shape[2]}x{arr.shape[1]}x{depth}); "
                              f"choose a slice (--slice INDEX [--axis 0|1|2])", depth)
    if axis not in (0, 1, 2):
        raise ImageError(f"{name}: slice axis must be 0, 1 or 2, got {axis}")
    n = arr.shape[2 - axis]
    if not 0 <= slice_index < n:
        raise ImageError(f"{name}: slice {slice_index} out of range 0..{n - 1} along axis {axis}")
    # image (x, y) -> volume index: k-slices use (i, j); j-slices (i, k); i-slices (j, k).
    inplane = {2: (0, 1), 1: (0, 2), 0: (1, 2)}[axis]
    index = [slice(None)] * 3
    index[2 - axis] = slice_index
    out = arr[tuple(index)]
    a = np.c_[cols[:, inplane[0]], cols[:, inplane[1]], org + cols[:, axis] * slice_index]
    return out, a
