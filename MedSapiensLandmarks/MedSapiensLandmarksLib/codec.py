"""Image framing and heatmap decoding (mmpose UDP conventions), in numpy only.

A `Box` maps original pixel coordinates to any grid laid over it (model input or heatmap)
with the unbiased (UDP) rule ``u = (x - cx + sw/2) * (W_grid - 1) / sw``; its inverse brings
predictions back to original pixels exactly. Decoding is integer argmax + DARK refinement,
with a per-landmark confidence. Every backend (ONNX Runtime, torch) and training share this
one implementation; encoding (Gaussian targets) lives with training.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Box:
    """Region of the original image (centre and size, in pixels) that fills the model input."""

    cx: float
    cy: float
    sw: float
    sh: float

    @classmethod
    def whole_image(cls, height: int, width: int, aspect: float, padding: float = 1.0) -> "Box":
        """Box around the whole image, enlarged by ``padding`` then to aspect w/h (mmpose)."""
        sw, sh = (width - 1) * padding, (height - 1) * padding
        if sw > aspect * sh:
            sh = sw / aspect
        else:
            sw = sh * aspect
        return cls((width - 1) / 2.0, (height - 1) / 2.0, sw, sh)

    def to_grid(self, xy: np.ndarray, grid_wh: tuple[int, int]) -> np.ndarray:
        """Original pixels (x, y) -> coordinates on a grid of grid_wh = (W, H) points."""
        xy = np.asarray(xy, dtype=np.float64)
        scale = np.array([(grid_wh[0] - 1) / self.sw, (grid_wh[1] - 1) / self.sh])
        return (xy - [self.cx - self.sw / 2, self.cy - self.sh / 2]) * scale

    def from_grid(self, uv: np.ndarray, grid_wh: tuple[int, int]) -> np.ndarray:
        """Inverse of `to_grid`."""
        uv = np.asarray(uv, dtype=np.float64)
        scale = np.array([self.sw / (grid_wh[0] - 1), self.sh / (grid_wh[1] - 1)])
        return uv * scale + [self.cx - self.sw / 2, self.cy - self.sh / 2]


def to_gray(image: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 3) or (H, W, 4) -> (H, W) float32 grey."""
    if image.ndim == 2:
        return image.astype(np.float32, copy=False)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        rgb = image[..., :3].astype(np.float32)
        return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if image.ndim == 3 and image.shape[2] == 1:
        return image[..., 0].astype(np.float32)
    raise ValueError(f"expected a 2D grey or RGB(A) image, got array of shape {image.shape}")


def to_uint8_range(gray: np.ndarray, source_dtype: np.dtype) -> np.ndarray:
    """Bring intensities to 0..255: 8-bit data as is, anything else by its 0.5-99.5 percentiles."""
    if np.dtype(source_dtype) == np.uint8:
        return gray
    finite = gray[np.isfinite(gray)]
    if finite.size == 0:
        raise ValueError("image has no finite pixel values")
    lo, hi = np.percentile(finite, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    out = (np.nan_to_num(gray, nan=lo, posinf=hi, neginf=lo) - lo) * (255.0 / (hi - lo))
    return np.clip(out, 0.0, 255.0).astype(np.float32)


def _interpolation_matrix(coords: np.ndarray, size: int) -> np.ndarray:
    """(len(coords), size) linear-interpolation weights; neighbours outside [0, size) are zeros."""
    lo = np.floor(coords).astype(np.int64)
    frac = coords - lo
    m = np.zeros((len(coords), size), dtype=np.float64)
    rows = np.arange(len(coords))
    for idx, weight in ((lo, 1.0 - frac), (lo + 1, frac)):
        ok = (idx >= 0) & (idx < size)
        m[rows[ok], idx[ok]] += weight[ok]
    return m


def warp(gray: np.ndarray, box: Box, out_wh: tuple[int, int], antialias: bool = False) -> np.ndarray:
    """Resample the box of a (H, W) image onto an out_wh grid: bilinear, zeros outside.

    The box is axis-aligned, so sampling is separable: ``Wy @ image @ Wx.T``. With
    ``antialias`` the image is first average-pooled by the integer part of the scale factor
    (pixel centres accounted for exactly), which removes aliasing on big reductions.
    Returns float32 (H_out, W_out).
    """
    w_out, h_out = out_wh
    sx, sy = box.sw / (w_out - 1), box.sh / (h_out - 1)
    k = max(int(min(sx, sy)), 1) if antialias else 1
    xs = np.arange(w_out, dtype=np.float64) * sx + box.cx - box.sw / 2
    ys = np.arange(h_out, dtype=np.float64) * sy + box.cy - box.sh / 2
    # Read only the pixels the box touches (a k-aligned crop keeps the pooling grid fixed).
    h_full, w_full = gray.shape[-2:]
    x0 = max(0, (int(np.floor(xs[0])) - 1) // k * k)
    y0 = max(0, (int(np.floor(ys[0])) - 1) // k * k)
    x1 = min(w_full, int(np.ceil(xs[-1])) + 2 + k)
    y1 = min(h_full, int(np.ceil(ys[-1])) + 2 + k)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((h_out, w_out), dtype=np.float32)
    img = np.asarray(gray[y0:y1, x0:x1], dtype=np.float32)
    xs, ys = xs - x0, ys - y0
    if k > 1:
        hp, wp = img.shape[0] // k, img.shape[1] // k
        img = img[:hp * k, :wp * k].reshape(hp, k, wp, k).mean((1, 3), dtype=np.float64)
        xs, ys = (xs - (k - 1) / 2) / k, (ys - (k - 1) / 2) / k
    wy = _interpolation_matrix(ys, img.shape[0])
    wx = _interpolation_matrix(xs, img.shape[1])
    return (wy @ img @ wx.T).astype(np.float32)


def _gaussian_blur(hm: np.ndarray, kernel: int) -> np.ndarray:
    """cv2.GaussianBlur(ksize, sigma 0) on a zero-padded map, max rescaled back (mmpose)."""
    sigma = 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8
    r = kernel // 2
    g = np.exp(-(np.arange(kernel) - (kernel - 1) / 2) ** 2 / (2 * sigma ** 2))
    g /= g.sum()
    x = hm
    for axis in (-1, -2):  # separable: rows, then columns, as sums of shifted copies
        n = x.shape[axis]
        padded = np.pad(x, [(0, 0)] * (x.ndim + axis) + [(r, r)] + [(0, 0)] * (-axis - 1))
        x = sum(weight * np.take(padded, np.arange(t, t + n), axis=axis) for t, weight in enumerate(g))
    orig_max = hm.max((-2, -1), keepdims=True)
    return x * orig_max / np.maximum(x.max((-2, -1), keepdims=True), 1e-12)


def decode_heatmaps(heatmaps: np.ndarray, blur_kernel: int = 11) -> tuple[np.ndarray, np.ndarray]:
    """Argmax + DARK (UDP variant) on (B, K, H, W) heatmaps -> (B, K, 2) xy and (B, K) max value."""
    hm = np.asarray(heatmaps, dtype=np.float64)
    b, k, h, w = hm.shape
    flat = hm.reshape(b, k, -1)
    idx = flat.argmax(-1)
    score = np.take_along_axis(flat, idx[..., None], -1)[..., 0]
    x0, y0 = idx % w, idx // w
    logh = np.log(np.clip(_gaussian_blur(hm, blur_kernel), 1e-3, 50.0))
    pad = np.pad(logh, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge").reshape(b, k, -1)

    def at(dx: int, dy: int) -> np.ndarray:
        lin = (y0 + 1 + dy) * (w + 2) + (x0 + 1 + dx)
        return np.take_along_axis(pad, lin[..., None], -1)[..., 0]

    c = at(0, 0)
    gx, gy = 0.5 * (at(1, 0) - at(-1, 0)), 0.5 * (at(0, 1) - at(0, -1))
    dxx, dyy = at(1, 0) - 2 * c + at(-1, 0), at(0, 1) - 2 * c + at(0, -1)
    dxy = 0.5 * (at(1, 1) - at(1, 0) - at(0, 1) + 2 * c - at(-1, 0) - at(0, -1) + at(-1, -1))
    eps = float(np.finfo(np.float32).eps)
    a, d = dxx + eps, dyy + eps
    det = a * d - dxy * dxy
    safe = np.abs(det) > 1e-12
    det = np.where(safe, det, 1.0)
    ox = np.where(safe, -(d * gx - dxy * gy) / det, 0.0)
    oy = np.where(safe, -(-dxy * gx + a * gy) / det, 0.0)
    xy = np.stack([x0 + ox, y0 + oy], -1)
    return xy.astype(np.float32), score.astype(np.float32)


def softmax_heatmaps(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spatial softmax of logits -> (peak-1 heatmaps for DARK, probability mass near the peak).

    The confidence is the probability that the landmark lies within 2 heatmap pixels of the
    most likely position (the 5x5 window around the peak; outside the map counts as zero).
    """
    b, k, h, w = logits.shape
    flat = np.asarray(logits, dtype=np.float32).reshape(b, k, -1)
    flat = np.exp(flat - flat.max(-1, keepdims=True))
    prob = (flat / flat.sum(-1, keepdims=True)).reshape(b, k, h, w)
    peak = prob.max((2, 3), keepdims=True)
    idx = prob.reshape(b, k, -1).argmax(-1)
    py, px = idx // w, idx % w
    conf = np.empty((b, k), dtype=np.float32)
    for i in range(b):
        for j in range(k):
            y, x = py[i, j], px[i, j]
            conf[i, j] = prob[i, j, max(0, y - 2):y + 3, max(0, x - 2):x + 3].sum()
    return prob / peak, np.clip(conf, 0.0, 1.0)
