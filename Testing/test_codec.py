import numpy as np
import pytest
import torch

from MedSapiensLandmarksLib.codec import Box, decode_heatmaps, softmax_heatmaps, to_uint8_range, warp
from MedSapiensLandmarksLib.training import encode_heatmaps


@pytest.mark.parametrize("xy", [(20.3, 31.7), (47.55, 12.05), (5.9, 60.41)])
def test_gaussian_decodes_to_its_subpixel_centre(xy):
    hm = encode_heatmaps(torch.tensor([[xy]], dtype=torch.float64), (64, 80), sigma=2.0)
    assert hm.shape == (1, 1, 80, 64)
    assert hm.max() <= 1.0
    dec, score = decode_heatmaps(hm.numpy())
    assert np.abs(dec[0, 0] - np.array(xy)).max() < 0.05
    assert 0.9 < score.item() <= 1.0


def test_several_channels_decode_independently():
    pts = torch.tensor([[[10.25, 40.8], [50.6, 5.3], [31.0, 33.0]]])
    dec, _ = decode_heatmaps(encode_heatmaps(pts, (64, 48), sigma=2.0).numpy())
    assert np.allclose(dec, pts.numpy(), atol=0.05)


def test_mmpose_framing_of_a_cephalogram():
    # MedSapiens: box = whole image * 1.25, aspect 0.75 -> 1935x2400 fills ~614x761 of 768x1024.
    box = Box.whole_image(2400, 1935, aspect=768 / 1024, padding=1.25)
    # the image is wider than 3:4, so the width sets the box and the height is enlarged
    assert box.sw == pytest.approx(1934 * 1.25)
    assert box.sh == pytest.approx(1934 * 1.25 / 0.75)
    corners = box.to_grid(np.array([[0.0, 0.0], [1934.0, 2399.0]]), (768, 1024))
    fill = corners[1] - corners[0]
    assert fill[0] == pytest.approx(1934 * 767 / box.sw) and 610 < fill[0] < 618
    assert 759 < fill[1] < 763
    # the notes' formula: x_in = (x - c_x + s_w/2) * 767 / s_w
    x = 1000.0
    assert box.to_grid([[x, 0.0]], (768, 1024))[0, 0] == pytest.approx((x - 967 + box.sw / 2) * 767 / box.sw)


def test_point_round_trip_image_input_heatmap_image():
    box = Box.whole_image(2400, 1935, aspect=0.75, padding=1.25)
    pts = np.array([[0.0, 0.0], [1934.0, 2399.0], [803.37, 1288.91], [1500.5, 20.25]])
    inp = box.to_grid(pts, (768, 1024))
    # input -> heatmap by the UDP rule, then heatmap -> image through the box
    hm = inp * np.array([191 / 767, 255 / 1023])
    back = box.from_grid(hm, (192, 256))
    assert np.abs(back - pts).max() < 0.01


def test_warp_samples_the_box_exactly():
    # A linear intensity ramp is reproduced exactly by bilinear sampling.
    h, w = 300, 240
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = 0.5 * xx + 0.25 * yy + 3.0
    box = Box(117.3, 151.8, 80.0, 100.0)
    out = warp(img, box, (41, 51))
    v, u = np.mgrid[0:51, 0:41]
    src = box.from_grid(np.c_[u.ravel(), v.ravel()], (41, 51))
    expected = 0.5 * src[:, 0] + 0.25 * src[:, 1] + 3.0
    assert np.abs(out.ravel() - expected).max() < 1e-3


def test_antialiased_warp_keeps_positions_of_a_linear_ramp():
    h, w = 400, 320
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = 0.5 * xx - 0.2 * yy + 100.0
    box = Box.whole_image(h, w, aspect=0.8)
    out = warp(img, box, (64, 80), antialias=True)
    v, u = np.mgrid[2:78, 2:62]  # interior: away from the zero padding
    src = box.from_grid(np.c_[u.ravel(), v.ravel()], (64, 80))
    expected = 0.5 * src[:, 0] - 0.2 * src[:, 1] + 100.0
    assert np.abs(out[2:78, 2:62].ravel() - expected).max() < 1e-2


def test_warp_outside_image_is_zero():
    img = np.full((50, 50), 7.0)
    out = warp(img, Box(300.0, 300.0, 20.0, 20.0), (8, 8))
    assert np.count_nonzero(out) == 0


def test_intensity_scaling_of_16_bit_images():
    raw = np.linspace(1000, 5000, 10000).reshape(100, 100)
    raw[0, :3] = 65535  # a few hot pixels (burned-in text, dead detector elements)
    out = to_uint8_range(raw, np.dtype(np.uint16))
    # 0.5-99.5 percentiles: the ramp spans the range; min-max would squash it under 20 grey levels
    lo, hi = np.percentile(raw, [0.5, 99.5])
    assert out.min() == 0 and out.max() == 255 and out[0, :3].tolist() == [255.0] * 3
    middle = raw[50, 50]
    assert out[50, 50] == pytest.approx((middle - lo) * 255 / (hi - lo), abs=1e-3)
    assert out[50, 50] > 100  # min-max scaling would give about 8
    eight = np.arange(256, dtype=np.float32).reshape(16, 16)
    assert np.array_equal(to_uint8_range(eight, np.dtype(np.uint8)), eight)
    with pytest.raises(ValueError, match="no finite"):
        to_uint8_range(np.full((4, 4), np.nan), np.dtype(np.float32))


def test_softmax_confidence_ranks_sharp_above_flat():
    sharp = encode_heatmaps(torch.tensor([[[20.0, 20.0]]]), (40, 40), 1.0)
    flat = encode_heatmaps(torch.tensor([[[20.0, 20.0]]]), (40, 40), 6.0)
    logits = torch.cat([torch.log(sharp + 1e-6) , torch.log(flat + 1e-6)], 1)
    hm, conf = softmax_heatmaps(logits.numpy())
    assert np.allclose(hm.max((2, 3)), np.ones((1, 2)))
    assert 0.9 < conf[0, 0] <= 1.0 and conf[0, 1] < 0.2
