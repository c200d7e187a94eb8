import json

import jsonschema
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import SCHEMA
from MedSapiensLandmarksLib.landmarks import Landmarks
from MedSapiensLandmarksLib.imageio import ImageError, read_image
from MedSapiensLandmarksLib.markups import read_markups, write_csv, write_fcsv, write_markups
from slicer_helpers import read_markups_with_slicer

FLIP = np.array([[-1.0, 0, 0], [0, 1.0, 0], [0, 0, -1.0]])  # mirrored x, reversed z


def write_volume(path, arr, spacing, origin, direction):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(np.asarray(direction).ravel().tolist())
    sitk.WriteImage(img, str(path))
    return img


def test_2d_geometry_follows_spacing_origin_direction(tmp_path):
    arr = np.random.default_rng(0).integers(0, 4000, (1, 60, 40)).astype(np.uint16)
    itk = write_volume(tmp_path / "r.nrrd", arr, (0.15, 0.25, 1.0), (10.0, -20.0, 5.0), FLIP)
    rad = read_image(tmp_path / "r.nrrd")
    assert rad.pixels.shape == (60, 40) and rad.spacing_known
    assert rad.spacing == pytest.approx((0.15, 0.25))
    xy = np.array([[0.0, 0.0], [12.5, 33.25], [39.0, 59.0]])
    expected = [itk.TransformContinuousIndexToPhysicalPoint((x, y, 0.0)) for x, y in xy]
    assert np.allclose(rad.to_lps(xy), expected, atol=1e-9)
    assert np.allclose(rad.to_pixels(rad.to_lps(xy)), xy, atol=1e-9)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_3d_volume_slice_geometry(tmp_path, axis):
    arr = np.random.default_rng(1).random((12, 30, 20)).astype(np.float32)
    itk = write_volume(tmp_path / "v.nrrd", arr, (0.5, 0.7, 2.0), (1.0, 2.0, 3.0), FLIP)
    with pytest.raises(ImageError, match="3D volume.*choose a slice"):
        read_image(tmp_path / "v.nrrd")
    idx = 5
    rad = read_image(tmp_path / "v.nrrd", slice_index=idx, axis=axis)
    xy = np.array([[3.0, 4.0], [7.5, 2.25]])
    ijk = {2: lambda x, y: (x, y, idx), 1: lambda x, y: (x, idx, y), 0: lambda x, y: (idx, x, y)}[axis]
    expected = [itk.TransformContinuousIndexToPhysicalPoint(ijk(x, y)) for x, y in xy]
    assert np.allclose(rad.to_lps(xy), expected, atol=1e-9)
    k, j, i = (np.array(ijk(int(xy[0, 0]), int(xy[0, 1])))[::-1])
    assert rad.pixels[int(xy[0, 1]), int(xy[0, 0])] == arr[k, j, i]
    with pytest.raises(ImageError, match="out of range"):
        read_image(tmp_path / "v.nrrd", slice_index=99, axis=axis)


def test_jpeg_spacing_override(ceph_dir):
    plain = read_image(ceph_dir / "images" / "151.jpg")
    assert not plain.spacing_known and plain.shape == (2400, 1935)
    mm = read_image(ceph_dir / "images" / "151.jpg", spacing=0.1)
    assert mm.spacing == pytest.approx((0.1, 0.1))
    assert np.allclose(mm.to_lps([[100.0, 200.0]]), [[10.0, 20.0, 0.0]])


@pytest.mark.parametrize("content,name,message", [
    (None, "missing.png", "file not found"),
    (b"", "empty.png", "empty file"),
    (b"this is not an image\n" * 10, "text.png", "not a readable image"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01", "truncated.jpg", "truncated JPEG"),
])
def test_bad_images_give_one_clear_error(tmp_path, content, name, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageError, match=message) as err:
        read_image(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def sample_landmarks(rad):
    xy = np.array([[5.0, 7.0], [20.25, 40.5], [33.0, 2.0]])
    return Landmarks(["S", "N", "Or"], ["sella", "nasion", "orbitale"], xy, rad.to_lps(xy),
                     np.array([0.91, 0.42, 0.77]), {"model": "test", "image": rad.path})


def test_markups_json_is_schema_valid_and_loads_in_slicer(tmp_path):
    arr = np.zeros((1, 60, 40), np.uint8)
    write_volume(tmp_path / "r.nrrd", arr, (0.15, 0.25, 1.0), (10.0, -20.0, 5.0), FLIP)
    rad = read_image(tmp_path / "r.nrrd")
    lm = sample_landmarks(rad)
    path = write_markups(tmp_path / "r.mrk.json", lm, corrected=[False, True, False])
    doc = json.loads(path.read_text())
    jsonschema.validate(doc, json.loads(SCHEMA.read_text()))
    labels, ras, descs = read_markups_with_slicer(path)
    assert labels == ["S", "N", "Or"]
    assert np.abs(ras - lm.lps * [-1, -1, 1]).max() < 1e-3  # Slicer holds RAS in memory
    assert descs[1] == "nasion (confidence 0.42)"
    back = read_markups(path)
    assert np.allclose(back["lps"], lm.lps) and back["extra"]["corrected"] == [False, True, False]


def test_fcsv_and_csv(tmp_path):
    write_volume(tmp_path / "r.nrrd", np.zeros((1, 50, 50), np.uint8), (0.1, 0.1, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    rad = read_image(tmp_path / "r.nrrd")
    lm = sample_landmarks(rad)
    fcsv = write_fcsv(tmp_path / "a.fcsv", lm).read_text().splitlines()
    assert fcsv[1] == "# CoordinateSystem = LPS"
    row = fcsv[4].split(",")
    assert row[11] == "N" and float(row[1]) == pytest.approx(2.025) and float(row[2]) == pytest.approx(4.05)
    rows = write_csv(tmp_path / "a.csv", lm).read_text().splitlines()
    assert rows[0].startswith("name,description,x_px") and rows[3].split(",")[0] == "Or"
    assert float(rows[3].split(",")[-1]) == pytest.approx(0.77)
