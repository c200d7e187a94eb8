"""Image framing and heatmap coding (mmpose UDP conventions).

A `Box` maps original pixel coordinates to any grid laid over it (model input or heatmap)
with the unbiased (UDP) rule ``u = (x - cx + sw/2) * (W_grid - 1) / sw``; its inverse brings
predictions back to original pixels exactly. Encoding makes Gaussian targets, decoding is
integer argmax + DARK refinement, with a per-landmark confidence.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F


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


def warp(gray: np.ndarray | torch.Tensor, box: Box, out_wh: tuple[int, int],
         antialias: bool = False) -> torch.Tensor:
    """Resample the box of a (H, W) image onto an out_wh grid (bilinear, zeros outside).

    With ``antialias`` the image is first average-pooled by the integer part of the scale
    factor (pixel centres accounted for exactly), which removes aliasing on big reductions.
    """
    w_out, h_out = out_wh
    sx, sy = box.sw / (w_out - 1), box.sh / (h_out - 1)
    k = max(int(min(sx, sy)), 1) if antialias else 1
    xs = torch.arange(w_out, dtype=torch.float64) * sx + box.cx - box.sw / 2
    ys = torch.arange(h_out, dtype=torch.float64) * sy + box.cy - box.sh / 2
    # Read only the pixels the box touches (a k-aligned crop keeps the pooling grid fixed).
    h_full, w_full = gray.shape[-2:]
    x0 = max(0, (int(np.floor(xs[0].item())) - 1) // k * k)
    y0 = max(0, (int(np.floor(ys[0].item())) - 1) // k * k)
    x1 = min(w_full, int(np.ceil(xs[-1].item())) + 2 + k)
    y1 = min(h_full, int(np.ceil(ys[-1].item())) + 2 + k)
    if x1 <= x0 or y1 <= y0:
        return torch.zeros(h_out, w_out)
    img = torch.as_tensor(gray[y0:y1, x0:x1], dtype=torch.float32)[None, None]
    xs, ys = xs - x0, ys - y0
    if k > 1:
        img = F.avg_pool2d(img, k)
        xs, ys = (xs - (k - 1) / 2) / k, (ys - (k - 1) / 2) / k
    h_in, w_in = img.shape[-2:]
    gx = (2 * xs / max(w_in - 1, 1) - 1).float()
    gy = (2 * ys / max(h_in - 1, 1) - 1).float()
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], -1)[None]
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]


def encode_heatmaps(xy: torch.Tensor, hm_wh: tuple[int, int], sigma: float) -> torch.Tensor:
    """UDP Gaussian targets (peak 1) for keypoints (..., K, 2) given in heatmap pixels."""
    w, h = hm_wh
    gx = torch.arange(w, dtype=xy.dtype, device=xy.device)
    gy = torch.arange(h, dtype=xy.dtype, device=xy.device)
    dx2 = (gx - xy[..., 0:1]) ** 2  # (..., K, W)
    dy2 = (gy - xy[..., 1:2]) ** 2  # (..., K, H)
    return torch.exp(-(dy2[..., :, None] + dx2[..., None, :]) / (2 * sigma ** 2))


def _gaussian_blur(hm: torch.Tensor, kernel: int) -> torch.Tensor:
    """cv2.GaussianBlur(ksize, sigma 0) on a zero-padded map, max rescaled back (mmpose)."""
    sigma = 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8
    r = torch.arange(kernel, dtype=hm.dtype) - (kernel - 1) / 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    b, k, h, w = hm.shape
    x = hm.reshape(b * k, 1, h, w)
    x = F.conv2d(x, g.view(1, 1, 1, -1), padding=(0, kernel // 2))
    x = F.conv2d(x, g.view(1, 1, -1, 1), padding=(kernel // 2, 0)).reshape(b, k, h, w)
    orig_max = hm.amax((2, 3), keepdim=True)
    return x * orig_max / x.amax((2, 3), keepdim=True).clamp_min(1e-12)


def decode_heatmaps(heatmaps: torch.Tensor, blur_kernel: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax + DARK (UDP variant) on (B, K, H, W) heatmaps -> (B, K, 2) xy and (B, K) max value."""
    hm = heatmaps.detach().double()
    b, k, h, w = hm.shape
    flat = hm.reshape(b, k, -1)
    score, idx = flat.max(-1)
    x0, y0 = (idx % w), (idx // w)
    logh = torch.log(_gaussian_blur(hm, blur_kernel).clamp(1e-3, 50.0))
    pad = F.pad(logh, (1, 1, 1, 1), mode="replicate")

    def at(dx: int, dy: int) -> torch.Tensor:
        lin = (y0 + 1 + dy) * (w + 2) + (x0 + 1 + dx)
        return pad.reshape(b, k, -1).gather(-1, lin[..., None])[..., 0]

    c = at(0, 0)
    gx, gy = 0.5 * (at(1, 0) - at(-1, 0)), 0.5 * (at(0, 1) - at(0, -1))
    dxx, dyy = at(1, 0) - 2 * c + at(-1, 0), at(0, 1) - 2 * c + at(0, -1)
    dxy = 0.5 * (at(1, 1) - at(1, 0) - at(0, 1) + 2 * c - at(-1, 0) - at(0, -1) + at(-1, -1))
    eps = float(np.finfo(np.float32).eps)
    a, d = dxx + eps, dyy + eps
    det = a * d - dxy * dxy
    safe = det.abs() > 1e-12
    det = torch.where(safe, det, torch.ones_like(det))
    ox = torch.where(safe, -(d * gx - dxy * gy) / det, torch.zeros_like(det))
    oy = torch.where(safe, -(-dxy * gx + a * gy) / det, torch.zeros_like(det))
    xy = torch.stack([x0 + ox, y0 + oy], -1)
    return xy.float(), score.float()


def softmax_heatmaps(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial softmax of logits -> (peak-1 heatmaps for DARK, probability mass near the peak).

    The confidence is the probability that the landmark lies within 2 heatmap pixels of the
    most likely position.
    """
    b, k, h, w = logits.shape
    prob = torch.softmax(logits.reshape(b, k, -1).float(), -1).reshape(b, k, h, w)
    peak = prob.amax((2, 3), keepdim=True)
    mass = F.avg_pool2d(prob, 5, stride=1, padding=2, count_include_pad=True) * 25
    conf = mass.reshape(b, k, -1).gather(-1, prob.reshape(b, k, -1).argmax(-1, keepdim=True))[..., 0]
    return prob / peak, conf.clamp(0, 1)
