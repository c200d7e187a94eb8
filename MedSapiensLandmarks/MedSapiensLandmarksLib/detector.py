"""Detector API: radiograph -> named landmarks with pixel, physical position and confidence."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .codec import Box, decode_heatmaps, softmax_heatmaps, to_gray, to_uint8_range, warp
from .imageio import Radiograph
from .model import LandmarkNet


@dataclass
class Landmarks:
    """Detection result for one image; positions in original pixels and LPS millimetres."""

    names: list[str]
    descriptions: list[str]
    xy: np.ndarray  # (K, 2) pixels, x = column, y = row
    lps: np.ndarray  # (K, 3) mm
    confidence: np.ndarray  # (K,) in [0, 1]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)


LOCAL_STAGES = ("context", "refine")  # optional patch stages, run in this order after coarse


class Detector:
    """A landmark model + its card: a whole-image ``coarse`` net, then optional local patch nets
    (``context``: a wide patch around each coarse guess, ``refine``: a small full-resolution one).
    """

    def __init__(self, card: dict[str, Any], nets: dict[str, LandmarkNet],
                 device: str | None = None) -> None:
        self.card = card
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.nets = {name: net.to(self.device).eval() for name, net in nets.items() if net is not None}
        self.coarse = self.nets["coarse"]
        self.channels_last = False
        self.names = [lm["name"] for lm in card["landmarks"]]
        self.descriptions = [lm.get("description", lm["name"]) for lm in card["landmarks"]]
        self.timings: dict[str, float] = {}

    def use_channels_last(self) -> "Detector":
        """CNN nets in channels-last memory on CPU: 15-35 % faster forwards, outputs equal to
        1e-5 (bench/cpu_fast_path.py). For inference only: it changes the nets' parameters."""
        if self.device.type == "cpu":
            for net in self.nets.values():
                if net.config["family"] == "unet":
                    net.to(memory_format=torch.channels_last)
            self.channels_last = True
        return self

    @classmethod
    def load(cls, model: str | Path = "default", device: str | None = None,
             threads: int | None = None) -> "Detector":
        """Load ``"default"``, a shipped model name, a model card / folder, or an official .pth."""
        from .checkpoints import load_model

        set_threads(threads)
        return load_model(model, device=device)

    # -- preprocessing -------------------------------------------------------------------
    def _gray(self, image: Radiograph) -> np.ndarray:
        return to_uint8_range(to_gray(image.pixels), image.pixels.dtype)

    def _to_tensor(self, planes: Sequence[torch.Tensor], spec: dict[str, Any]) -> torch.Tensor:
        x = torch.stack(list(planes))[:, None]  # B, 1, H, W on 0..255
        chans = spec.get("channels", 1)
        x = x.expand(-1, chans, -1, -1)
        mean = torch.tensor(spec["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(spec["std"], dtype=torch.float32).view(1, -1, 1, 1)
        return ((x - mean) / std).to(self.device)

    def _heatmaps(self, net: LandmarkNet, x: torch.Tensor, spec: dict[str, Any]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run a net (optionally with flip test) -> (peak-1 heatmaps, confidence)."""
        if self.channels_last and net.config["family"] == "unet":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = net(x).float()  # on a GPU in bf16 (not measured here: no GPU lent)
            if spec.get("flip_test"):
                out = 0.5 * (out + net(x.flip(-1)).float().flip(-1))
        if spec.get("activation", "none") == "softmax":
            return softmax_heatmaps(out)
        return out, out.amax((2, 3)).clamp(0, 1)

    # -- detection -----------------------------------------------------------------------
    @torch.inference_mode()
    def detect(self, image: Radiograph) -> Landmarks:
        return self.detect_batch([image])[0]

    @torch.inference_mode()
    def detect_batch(self, images: Sequence[Radiograph]) -> list[Landmarks]:
        """Detect on several images; `timings` then holds seconds per stage of this call."""
        clock = _Clock()
        spec = self.card["coarse"]["input"]
        h_in, w_in = spec["size"]
        grays = [self._gray(im) for im in images]
        boxes = [Box.whole_image(*g.shape, aspect=w_in / h_in, padding=spec.get("padding", 1.0))
                 for g in grays]
        planes = [warp(g, b, (w_in, h_in), spec.get("antialias", False)) for g, b in zip(grays, boxes)]
        x = self._to_tensor(planes, spec)
        clock.lap("preprocess")
        mirrored = torch.zeros(len(images), dtype=torch.bool)
        if spec.get("orientation") == "auto":
            # Also look at the mirror image (a cephalogram facing the other way; one batch with
            # the original) and keep, per image, the orientation the model is more confident about.
            hm, conf = self._heatmaps(self.coarse, torch.cat([x, x.flip(-1)]), spec)
            n = len(images)
            hm, hm_m, conf, conf_m = hm[:n], hm[n:], conf[:n], conf[n:]
            mirrored = conf_m.mean(1).cpu() > conf.mean(1).cpu()
            pick = mirrored.to(hm.device)
            hm = torch.where(pick[:, None, None, None], hm_m, hm)
            conf = torch.where(pick[:, None], conf_m, conf)
        else:
            hm, conf = self._heatmaps(self.coarse, x, spec)
        clock.lap("forward")
        uv, _ = decode_heatmaps(hm)
        clock.lap("decode")
        hm_wh = (hm.shape[-1], hm.shape[-2])
        uv[mirrored, :, 0] = hm_wh[0] - 1 - uv[mirrored, :, 0]
        results = []
        for i, (image, gray, box) in enumerate(zip(images, grays, boxes)):
            xy = box.from_grid(uv[i].cpu().numpy(), hm_wh)
            c = conf[i].cpu().numpy()
            for stage in self.local_stages:
                for _ in range(self.card[stage].get("iterations", 1)):
                    xy, c = self._refine(stage, gray, box, xy, bool(mirrored[i]))
            results.append(Landmarks(list(self.names), list(self.descriptions), xy,
                                     image.to_lps(xy), c.astype(np.float64),
                                     {"model": self.card.get("name", ""), "image": image.path}))
        clock.lap("refine")
        self.timings = clock.laps
        return results

    @property
    def local_stages(self) -> list[str]:
        return [s for s in LOCAL_STAGES if s in self.nets]

    def _refine(self, stage: str, gray: np.ndarray, box: Box, xy: np.ndarray, mirrored: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
        """Another look at each landmark in a patch (native resolution) around its current guess."""
        spec = self.card[stage]["input"]
        ph, pw = spec["size"]
        frac = spec["box_fraction"]
        patches = [Box(float(x), float(y), box.sh * frac * pw / ph, box.sh * frac) for x, y in xy]
        planes = [warp(gray, p, (pw, ph), spec.get("antialias", False)) for p in patches]
        x = self._to_tensor(planes, spec)
        hm, conf = self._heatmaps(self.nets[stage], x.flip(-1) if mirrored else x, spec)
        k = torch.arange(len(patches))
        hm_k, conf_k = hm[k, k][:, None], conf[k, k]
        uv, _ = decode_heatmaps(hm_k)
        hm_wh = (hm.shape[-1], hm.shape[-2])
        if mirrored:
            uv[..., 0] = hm_wh[0] - 1 - uv[..., 0]
        out = np.stack([p.from_grid(uv[i, 0].cpu().numpy(), hm_wh) for i, p in enumerate(patches)])
        return out, conf_k.cpu().numpy()


class _Clock:
    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._t
        self._t = now


def set_threads(threads: int | None) -> None:
    """CPU threads for inference: the given number, else the physical cores (at most 8)."""
    if threads is None:
        threads = max(1, min(8, (os.cpu_count() or 2)))
    torch.set_num_threads(threads)
