"""Detector API: radiograph -> named landmarks with pixel, physical position and confidence.

Pre- and post-processing are numpy; the networks run on a `backends.Backend` (ONNX Runtime
or torch), so detection with a shipped model never imports torch.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .adaptation import SiteLayer, apply_layer
from .backends import Backend
from .calibration import apply as calibrated
from .calibration import error_model
from .codec import Box, decode_heatmaps, softmax_heatmaps, to_gray, to_uint8_range, warp
from .imageio import Radiograph
from .landmarks import Landmarks
from .shape import ShapeModel, recheck, verdict, warning_text

LOCAL_STAGES = ("context", "refine")  # optional patch stages, run in this order after coarse


class Detector:
    """A landmark model + its card: a whole-image ``coarse`` net, then optional local patch nets
    (``context``: a wide patch around each coarse guess, ``refine``: a small full-resolution one).
    """

    def __init__(self, card: dict[str, Any], backend: Backend, recheck: bool = True) -> None:
        self.card = card
        self.recheck = recheck  # re-look at points the others put elsewhere (needs a shape model)
        self.backend = backend
        self.names = [lm["name"] for lm in card["landmarks"]]
        self.descriptions = [lm.get("description", lm["name"]) for lm in card["landmarks"]]
        self.timings: dict[str, float] = {}
        shape = card.get("shape")
        self.shape = ShapeModel(shape) if shape and "thresholds" in shape else None
        site = card.get("site_layer")  # `adapt`: how one clinic places the points
        self.site = SiteLayer.from_json(site) if site else None

    @classmethod
    def load(cls, model: str | Path = "default", device: str | None = None,
             threads: int | None = None, backend: str | None = None, recheck: bool = True,
             **options: Any) -> "Detector":
        """Load ``"default"``, a shipped model name, a model card / folder, or an official .pth.

        ``backend``: "onnx" or "torch" (default: ONNX Runtime for ONNX models on the CPU, torch
        otherwise); ``recheck``: the shape re-check of gross errors (`shape.recheck`);
        ``options`` go to the official-checkpoint loader (pretrain, anatomy, flip).
        """
        from .loading import load_model

        card, be = load_model(model, device=device, threads=threads, backend=backend, **options)
        return cls(card, be, recheck)

    @property
    def nets(self) -> dict[str, Any]:
        """The torch nets (torch backend only: training, fine-tuning, benchmarks of the nets)."""
        nets = getattr(self.backend, "nets", None)
        if nets is None:
            raise TypeError(f"the {self.backend.name} backend has no torch nets; load with backend='torch'")
        return nets

    # -- networks --------------------------------------------------------------------------
    def _heatmaps(self, stage: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run a stage (with its flip test when the card asks) -> (peak-1 heatmaps, confidence)."""
        spec = self.card[stage]["input"]
        if spec.get("flip_test"):  # mmpose flip_mode='heatmap', shift_heatmap=False
            both = self.backend.run(stage, np.concatenate([x, x[..., ::-1]]))
            out = 0.5 * (both[:len(x)] + both[len(x):][..., ::-1])
        else:
            out = self.backend.run(stage, x)
        if spec.get("activation", "none") == "softmax":
            return softmax_heatmaps(out)
        return out, np.clip(out.max((2, 3)), 0.0, 1.0)

    @staticmethod
    def _to_input(planes: Sequence[np.ndarray], spec: dict[str, Any]) -> np.ndarray:
        x = np.stack(planes)[:, None]  # B, 1, H, W on 0..255
        x = np.broadcast_to(x, (x.shape[0], spec.get("channels", 1), *x.shape[2:]))
        mean = np.asarray(spec["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(spec["std"], dtype=np.float32).reshape(1, -1, 1, 1)
        return np.ascontiguousarray((x - mean) / std, dtype=np.float32)

    # -- detection -----------------------------------------------------------------------
    def detect(self, image: Radiograph) -> Landmarks:
        return self.detect_batch([image])[0]

    def _coarse_input(self, images: Sequence[Radiograph]) -> tuple[list[np.ndarray], list[Box], np.ndarray]:
        """Grey images, their whole-image boxes, and the coarse net's input batch."""
        spec = self.card["coarse"]["input"]
        h_in, w_in = spec["size"]
        grays = [to_uint8_range(to_gray(im.pixels), im.pixels.dtype) for im in images]
        boxes = [Box.whole_image(*g.shape, aspect=w_in / h_in, padding=spec.get("padding", 1.0))
                 for g in grays]
        x = self._to_input([warp(g, b, (w_in, h_in), spec.get("antialias", False))
                            for g, b in zip(grays, boxes)], spec)
        return grays, boxes, x

    def orientation_confidence(self, images: Sequence[Radiograph]) -> tuple[np.ndarray, np.ndarray]:
        """Mean coarse confidence of each image as it is and mirrored."""
        _, _, x = self._coarse_input(images)
        _, conf = self._heatmaps("coarse", np.concatenate([x, x[..., ::-1]]))
        return conf[:len(images)].mean(1), conf[len(images):].mean(1)

    def detect_batch(self, images: Sequence[Radiograph]) -> list[Landmarks]:
        """Detect on several images; `timings` then holds seconds per stage of this call."""
        clock = _Clock()
        spec = self.card["coarse"]["input"]
        grays, boxes, x = self._coarse_input(images)
        clock.lap("preprocess")
        n = len(images)
        hm, conf = self._heatmaps("coarse", x)
        mirrored = np.zeros(n, dtype=bool)
        if spec.get("orientation") == "auto" and not spec.get("flip_test"):
            # An image the model is unsure about (mean confidence below the card's
            # "mirror_check_below"; without it, every image) is also looked at mirrored (a
            # cephalogram facing the other way); the more confident orientation is kept. With
            # the flip test on, both orientations are already averaged alike: nothing to choose.
            unsure = np.flatnonzero(conf.mean(1) < spec.get("mirror_check_below", np.inf))
            if len(unsure):
                hm_m, conf_m = self._heatmaps("coarse", np.ascontiguousarray(x[unsure][..., ::-1]))
                better = conf_m.mean(1) > conf[unsure].mean(1)
                hm[unsure[better]], conf[unsure[better]] = hm_m[better], conf_m[better]
                mirrored[unsure[better]] = True
        clock.lap("forward")
        uv, _ = decode_heatmaps(hm)
        clock.lap("decode")
        hm_wh = (hm.shape[-1], hm.shape[-2])
        uv[mirrored, :, 0] = hm_wh[0] - 1 - uv[mirrored, :, 0]
        results = []
        for i, (image, gray, box) in enumerate(zip(images, grays, boxes)):
            xy, c = box.from_grid(uv[i], hm_wh), conf[i]
            xy, c = self._local(gray, box, xy, c, bool(mirrored[i]))
            moved: list[int] = []
            if self.shape is not None and self.recheck and self.local_stages:
                xy, c, moved = recheck(self.shape, xy, c, lambda k, start, g=gray, b=box, m=bool(mirrored[i]):
                                       self._relook(g, b, k, start, m))
            meta = {"model": self.card.get("name", ""), "image": image.path,
                    "raw_confidence": c.astype(np.float64), "error_model": error_model(self.card.get("calibration"))}
            if self.shape is not None:
                meta["plausibility"] = verdict(self.shape, xy, c).to_json()
                meta["plausibility"]["rechecked"] = [self.names[k] for k in moved]
                if not meta["plausibility"]["plausible"]:
                    meta["plausibility"]["warning"] = warning_text(self.card, meta["plausibility"])
                meta["shape_deviation"] = self.shape.point_deviation(xy)[0]
            # the model's own points, for fitting a site layer later (`site_model`)
            meta["model_pixels"], meta["model_ref"] = xy.copy(), self.card.get("base_name", self.card.get("name", ""))
            if self.site is not None:  # after the checks: they judge the model's own points
                xy = apply_layer(xy, image.spacing, self.names, self.site)
                meta["site_layer"] = {"cases": len(self.site.cases), "frame": self.site.frame,
                                      "withheld": self.site.withheld}
            # confidence: P(within 2 mm) when the card is calibrated, else the network's own
            results.append(Landmarks(list(self.names), list(self.descriptions), xy, image.to_lps(xy),
                                     calibrated(self.card.get("calibration"), c), meta))
        clock.lap("refine")
        self.timings = clock.laps
        return results

    @property
    def local_stages(self) -> list[str]:
        return [s for s in LOCAL_STAGES if s in self.backend.stages]

    def _local(self, gray: np.ndarray, box: Box, xy: np.ndarray, conf: np.ndarray, mirrored: bool,
               which: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The local stages in turn (each as often as its card says) from ``xy`` (``_refine``)."""
        for stage in self.local_stages:
            for _ in range(self.card[stage].get("iterations", 1)):
                xy, conf = self._refine(stage, gray, box, xy, mirrored, which)
        return xy, conf

    def _relook(self, gray: np.ndarray, box: Box, k: int, start: np.ndarray, mirrored: bool
                ) -> tuple[np.ndarray, float]:
        """Landmark ``k`` through the local stages again, from ``start`` (the shape re-check)."""
        xy, c = self._local(gray, box, np.asarray(start, dtype=np.float64)[None], np.zeros(1), mirrored, [k])
        return xy[0], float(c[0])

    def _refine(self, stage: str, gray: np.ndarray, box: Box, xy: np.ndarray, mirrored: bool = False,
                which: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Another look at each landmark in a patch (native resolution) around its current guess;
        ``which``: the landmark indices of the rows of ``xy`` (default: every landmark in order)."""
        spec = self.card[stage]["input"]
        ph, pw = spec["size"]
        frac = spec["box_fraction"]
        patches = [Box(float(x), float(y), box.sh * frac * pw / ph, box.sh * frac) for x, y in xy]
        x = self._to_input([warp(gray, p, (pw, ph), spec.get("antialias", False)) for p in patches], spec)
        hm, conf = self._heatmaps(stage, np.ascontiguousarray(x[..., ::-1]) if mirrored else x)
        rows = np.arange(len(patches))
        k = rows if which is None else np.asarray(which)
        hm_k, conf_k = hm[rows, k][:, None], conf[rows, k]
        uv, _ = decode_heatmaps(hm_k)
        hm_wh = (hm.shape[-1], hm.shape[-2])
        if mirrored:
            uv[..., 0] = hm_wh[0] - 1 - uv[..., 0]
        out = np.stack([p.from_grid(uv[i, 0], hm_wh) for i, p in enumerate(patches)])
        return out, conf_k


class _Clock:
    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._t
        self._t = now
