"""What the overlay PNG and the patient report show: colours by calibrated confidence, the
plausibility banner, corrected and missing points (pixels and PDF text, not only sizes)."""
import numpy as np
import pytest

from MedSapiensLandmarksLib.imageio import Radiograph
from MedSapiensLandmarksLib.landmarks import Landmarks
from MedSapiensLandmarksLib.overlay import BANNER, COLOURS, GRAYS, render_overlay

WARNING = {"plausible": False, "warning": "does not look like a lateral cephalogram for model x"}


def picture():
    image = Radiograph(np.full((300, 400), 90, np.uint8), np.array([[0.1, 0, 0], [0, 0.1, 0], [0, 0, 0.0]]), True,
                       "synthetic.png")
    xy = np.array([[100.0, 150.0], [300.0, 150.0], [np.nan, np.nan]])  # the third: marked missing
    lm = Landmarks(["P1", "P2", "P3"], ["one", "two", "three"], xy, image.to_lps(xy), np.array([0.95, 0.2, 0.7]),
                   {"model": "test-model", "image": "synthetic.png"})
    return image, lm


def ring_colours(pic, x, y, r=12):
    """The drawing colours (RGB) within ``r`` pixels of (x, y)."""
    idx = np.asarray(pic)[y - r:y + r + 1, x - r:x + r + 1]
    return {COLOURS[i - GRAYS] for i in np.unique(idx[idx >= GRAYS]).tolist()}


def test_overlay_rings_take_the_confidence_colour_and_a_missing_point_none():
    image, lm = picture()
    pic = render_overlay(image, lm)
    assert pic.size == (400, 300)
    (sure,) = ring_colours(pic, 100, 150)  # 0.95: near the green end of yellow-to-green
    assert sure[1] == 220 and sure[0] < 60 and sure[2] < 60
    assert ring_colours(pic, 300, 150) == {(255, 40, 40)}  # 0.2, below 0.5: red
    drawn = np.asarray(pic) >= GRAYS
    assert not drawn[:, 150:250].any() and not drawn[:60].any()  # nothing else: no banner, no third ring


def test_overlay_banner_spans_the_top_only_when_the_image_is_implausible():
    image, lm = picture()
    lm.meta["plausibility"] = WARNING
    top = np.asarray(render_overlay(image, lm))[:8]
    assert (top == BANNER).mean() > 0.8  # a red band across the top (white text on it)


def test_report_marks_corrected_and_missing_points_and_the_warning():
    pypdfium2 = pytest.importorskip("pypdfium2")
    from MedSapiensLandmarksLib.patient_report import write_patient_report

    image, lm = picture()
    lm.meta["plausibility"] = WARNING
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as out:
        path = write_patient_report(Path(out) / "r.pdf", image, lm, corrected=[False, True, False])
        pdf = pypdfium2.PdfDocument(str(path))
        text = pdf[0].get_textpage().get_text_range()
        rgb = np.asarray(pdf[0].render(scale=2.0).to_pil().convert("RGB")).astype(int)
        pdf.close()
    lines = [t.strip() for t in text.splitlines()]
    assert "Warning: does not look like a lateral cephalogram for model x" in " ".join(lines)
    assert "2 P2 0.20 yes" in lines and "3 P3 0.70 missing" in lines and "1 P1 0.95" in lines
    assert "test-model" in text
    # P2 is corrected: verified (green), never red although its confidence is 0.2; so no red
    # ring or table text anywhere, and the banner is the only dark red
    red = (rgb[..., 0] > 200) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)
    assert red.sum() == 0
    green = (rgb[..., 1] > 180) & (rgb[..., 0] < 80) & (rgb[..., 2] < 120)
    assert green.sum() > 20
