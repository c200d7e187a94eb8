"""Training: whole-image (coarse) and local-patch (refine) heatmap nets, resumable, logged.

Augmentation is done by torchvision.transforms.v2 on (Image, KeyPoints) pairs; targets are
UDP Gaussians from `codec.encode_heatmaps`; the loss is a spatial-softmax cross-entropy
against the normalised Gaussian (stable and fast to converge from scratch on CPU).
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torchvision.transforms.v2 as v2
from torch.nn import functional as F
from torchvision import tv_tensors

from .atomic import atomic_write
from .codec import Box, to_gray, to_uint8_range, warp
from .datasets import Case
from .imageio import read_image
from .landmarks import HAND_37
from .metrics import radial_errors
from .model import LandmarkNet

GRAY_MEAN, GRAY_STD = [127.5], [64.0]


@dataclass
class TrainConfig:
    coarse_size: tuple[int, int] = (320, 256)  # H, W
    refine_size: tuple[int, int] = (64, 64)
    refine_fraction: float = 0.06  # patch height as a fraction of the image box height
    context_size: tuple[int, int] = (64, 64)
    context_fraction: float = 0.14  # the optional wide-patch stage between coarse and refine
    encoder: str = "resnet18"
    coarse_decoder: tuple[int, ...] = (256, 128, 64, 32)
    refine_decoder: tuple[int, ...] = (256, 128, 64, 32)
    refine_encoder: str | None = None  # encoder of the local nets (None: ``encoder``)
    refine_depth: int | None = None  # encoder levels of the local nets (None: all)
    scale_range: tuple[float, float] = (0.9, 1.1)  # coarse affine scale augmentation
    coarse_rotation: float = 8.0  # coarse affine rotation +- degrees
    coarse_translate: float = 0.04  # coarse affine shift +- fraction of the input size
    coarse_warp: tuple[float, float] = (0.0, 0.0)  # (probability, std as a fraction of the shorter
    # side) of a smooth random deformation of the whole image (`_SmoothWarp`): anatomy's variation
    patch_scale: float = 0.1  # local patches: log-uniform scale jitter +-
    patch_rotation: float = 10.0  # local patches: rotation jitter +- degrees
    patch_site_shift: float = 0.0  # local patches: probability of each `_SiteShift` change
    site_shift: float = 0.0  # probability of each scanner/site change (borders, marks, JPEG)
    exposure: tuple[float, float, float, float] = (0.4, 0.25, 0.35, 0.0)  # +- log gamma, brightness,
    # contrast, grey offset (fraction of full range): the exposure curves of other scanners
    orientation: str = "auto"  # detection also tries the mirror image and keeps the surer one
    coarse_epochs: int = 40
    context_epochs: int = 0
    refine_epochs: int = 25
    batch_size: int = 4
    refine_batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    sigma: float = 1.5  # heatmap pixels
    refine_jitter: float = 0.25  # std of the patch-centre jitter, in patch heights (local stages)
    context_jitter: float | None = None  # the context stage's (None: ``refine_jitter``)
    refine_jitter_tail: tuple[float, float] = (0.0, 0.0)  # (share, std in patch heights): that share
    # of the patch stage's centres is drawn from a wider Gaussian (the whole-image stage's far misses)
    ema_decay: float = 0.0  # > 0: the stage ends with an exponential moving average of its weights
    seed: int = 0
    threads: int = 2
    checkpoint_every_s: float = 60.0  # resumable checkpoint at most this often (and at the end)
    device: str = "cpu"  # "cuda": nets and batches on the GPU (bfloat16 autocast), augmentation on CPU
    workers: int = 0  # data-loader processes (augmentation) beside the training loop
    train_check: int = 0  # also log the MRE on this many training images (the fit diagnosis)


# Named recipes (configs as data): "v1" trained the models of release 0.1; "v2" is the
# <= 30 MB recipe: a 512x416 whole-image stage with a slim decoder, a small patch net, and
# augmentation for what differs between sites (pixel size, collimation, burned-in marks, JPEG);
# "v3" widens v2's patch stage at the same resolution (0.225 mm/pixel on ISBI): 128x128 over 12 %
# of the image height; the hand models' patch stage (on cephalograms it gained nothing on test1:
# docs/benchmarks.md, round 4).
_V2: dict[str, Any] = dict(
    coarse_size=(512, 416), coarse_decoder=(128, 64, 32, 32), refine_encoder="resnet10t",
    refine_decoder=(64, 32, 32), refine_depth=4, scale_range=(0.8, 1.25), patch_scale=0.1, site_shift=0.3)
_V3: dict[str, Any] = {**_V2, "refine_size": (128, 128), "refine_fraction": 0.12, "refine_jitter": 0.1}
_V4: dict[str, Any] = {**_V2, "refine_jitter": 0.12}
_V5: dict[str, Any] = {**_V4, "coarse_rotation": 15.0, "coarse_translate": 0.08, "coarse_warp": (0.5, 0.015)}
RECIPES: dict[str, dict[str, Any]] = {
    "v1": {},
    "v2": _V2,
    "v3": _V3,
    # higher-resolution whole-image stages (issue 27; the GPU path: bench/gpu_train.py)
    "v2-640": {**_V2, "coarse_size": (640, 512)},
    "v2-800": {**_V2, "coarse_size": (800, 640)},
    # v3 with a wider exposure augmentation (issue 28, item 3: the hand model's whole-image stage
    # lost 0.11 mm to the proxy scanner's exposure curve alone; docs/benchmarks.md, round 8)
    "v3-exposure": {**_V3, "exposure": (0.7, 0.35, 0.5, 0.1)},
    # v2 with the patch-centre jitter at the whole-image stage's error scale (0.12 patch heights,
    # 1.7 mm per axis on ISBI, against 3.6 mm): issue 27, docs/benchmarks.md, round 9
    "v4": _V4,
    # v4 with stronger whole-image geometry (rotation +-15, shift +-8 %, half the images smoothly
    # deformed): better on each of three folds, -0.030 +- 0.027 mm (docs/benchmarks.md, round 14);
    # "v5-640" is the same at 640x512, the GPU path's candidate
    "v5": _V5,
    "v5-640": {**_V5, "coarse_size": (640, 512)},
}


def recipe(name: str, **overrides: Any) -> TrainConfig:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return TrainConfig(**{**RECIPES[name], **overrides})


def load_gray(case: Case) -> np.ndarray:
    """Original-resolution grey image on 0..255 as uint8 (compact for in-memory caching)."""
    img = read_image(case.image, spacing=case.spacing)
    return np.clip(to_uint8_range(to_gray(img.pixels), img.pixels.dtype), 0, 255).astype(np.uint8)


def encode_heatmaps(xy: torch.Tensor, hm_wh: tuple[int, int], sigma: float) -> torch.Tensor:
    """UDP Gaussian targets (peak 1) for keypoints (..., K, 2) given in heatmap pixels."""
    w, h = hm_wh
    gx = torch.arange(w, dtype=xy.dtype, device=xy.device)
    gy = torch.arange(h, dtype=xy.dtype, device=xy.device)
    dx2 = (gx - xy[..., 0:1]) ** 2  # (..., K, W)
    dy2 = (gy - xy[..., 1:2]) ** 2  # (..., K, H)
    return torch.exp(-(dy2[..., :, None] + dx2[..., None, :]) / (2 * sigma ** 2))


def softmax_ce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy between the spatial softmax of logits and the normalised targets, averaged
    over the (B, K) heatmaps of nonzero ``weight`` (points marked missing weigh 0)."""
    b, k = logits.shape[:2]
    t = target.reshape(b, k, -1)
    t = t / t.sum(-1, keepdim=True).clamp_min(1e-12)
    ce = -(t * F.log_softmax(logits.reshape(b, k, -1), -1)).sum(-1)
    return ce.mean() if weight is None else (ce * weight).sum() / weight.sum().clamp_min(1.0)


def masked_mse(out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """mmpose's heatmap MSE over the (B, K) heatmaps of nonzero ``weight``."""
    per = ((out - target) ** 2).flatten(2).mean(-1)
    return (per * weight).sum() / weight.sum().clamp_min(1.0)


class _Photometric:
    """Radiograph intensity augmentation on a [0, 1] image: exposure (gamma, brightness,
    contrast, offset: ``TrainConfig.exposure``), blur, noise."""

    def __init__(self, exposure: Sequence[float]) -> None:
        self.gamma, brightness, contrast, self.offset = exposure
        self.jitter = v2.ColorJitter(brightness=brightness, contrast=contrast)
        self.blur = v2.RandomApply([v2.GaussianBlur(5, sigma=(0.3, 1.5))], p=0.25)
        self.noise = v2.RandomApply([v2.GaussianNoise(sigma=0.02)], p=0.3)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        img = self.jitter(img.clamp(0, 1) ** math.exp(random.uniform(-self.gamma, self.gamma)))
        if self.offset:
            img = img + random.uniform(-self.offset, self.offset)
        return self.noise(self.blur(img.clamp(0, 1))).clamp(0, 1)


class _SmoothWarp:
    """Smooth random deformation of a plane (1, H, W) and its keypoints (K, 2) in pixels, with
    probability ``p``: Gaussian displacements (std ``std`` x the shorter side) on a ``grid`` of
    control points, upsampled bicubically; keypoints move by the field's inverse (fixed point)."""

    def __init__(self, p: float, std: float, grid: tuple[int, int] = (5, 4)) -> None:
        self.p, self.std, self.grid = p, std, grid

    def __call__(self, img: torch.Tensor, kp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.p <= 0 or random.random() >= self.p:
            return img, kp
        h, w = img.shape[-2:]
        coarse = torch.randn((1, 2, *self.grid)) * self.std * min(h, w)
        field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)  # (1, 2, H, W) px
        scale = torch.tensor([2 / (w - 1), 2 / (h - 1)])
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        where = torch.stack([xs, ys], -1) + field[0].permute(1, 2, 0)  # output pixel -> input position
        out = F.grid_sample(img[None].float(), (where * scale - 1)[None], mode="bilinear",
                            padding_mode="zeros", align_corners=True)[0]
        moved = kp.clone()
        for _ in range(5):  # solve out + field(out) = kp
            at = F.grid_sample(field, (moved * scale - 1)[None, None], mode="bilinear", padding_mode="border",
                               align_corners=True)[0, :, 0].T
            moved = kp - at
        return out, moved


class _SiteShift:
    """What changes between scanners and sites, on a [0, 1] plane (1, H, W), each with
    probability ``p``: a collimation border, burned-in marks (text, rulers), JPEG compression."""

    def __init__(self, p: float) -> None:
        self.p = p
        self.jpeg = v2.JPEG(quality=(25, 90))

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.p <= 0:
            return img
        img = img.clone()
        _, h, w = img.shape
        if random.random() < self.p:  # collimation: one to two bands at the edges, dark or bright
            for _ in range(random.randint(1, 2)):
                side, frac = random.randrange(4), random.uniform(0.02, 0.15)
                value = random.choice([0.0, random.uniform(0.0, 0.2), 1.0])
                n = int(frac * (h if side < 2 else w))
                region = [img[:, :n], img[:, h - n:], img[:, :, :n], img[:, :, w - n:]][side]
                region.fill_(value)
        if random.random() < self.p:  # burned-in text blocks and ruler-like bars
            for _ in range(random.randint(1, 4)):
                bh, bw = random.randint(2, max(3, h // 12)), random.randint(2, max(3, w // 6))
                y, x = random.randrange(h - bh), random.randrange(w - bw)
                img[:, y:y + bh, x:x + bw] = random.uniform(0.8, 1.0)
        if random.random() < self.p:
            img = self.jpeg((img * 255).round().to(torch.uint8)).float() / 255.0
        return img


def _normalise(plane01: torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
    """[0, 1] grey plane(s) (1, H, W) -> the model's input channels and normalisation."""
    x = (plane01 * 255.0).expand(spec.get("channels", 1), -1, -1)
    mean = torch.tensor(spec["mean"], dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(spec["std"], dtype=torch.float32).view(-1, 1, 1)
    return (x - mean) / std


def image_box(shape: tuple[int, int], spec: dict[str, Any]) -> Box:
    """The whole-image box of the coarse stage, as the detector frames it."""
    h, w = spec["size"]
    return Box.whole_image(*shape, aspect=w / h, padding=spec.get("padding", 1.0))


class CoarseSet(torch.utils.data.Dataset):
    """Whole images framed as the coarse ``spec`` says, affine + photometric augmentation."""

    def __init__(self, cases: Sequence[Case], grays: Sequence[np.ndarray], spec: dict[str, Any],
                 augment: bool, cfg: TrainConfig | None = None) -> None:
        cfg = cfg or TrainConfig()
        h, w = spec["size"]
        self.items = []
        for case, gray in zip(cases, grays):
            box = image_box(gray.shape, spec)
            plane = torch.from_numpy(warp(gray, box, (w, h), antialias=spec.get("antialias", False)) / 255.0)
            self.items.append((plane, torch.tensor(box.to_grid(case.xy, (w, h)), dtype=torch.float32)))
        self.spec, self.size, self.augment = spec, (h, w), augment
        self.affine = v2.RandomAffine(degrees=cfg.coarse_rotation, translate=(cfg.coarse_translate,) * 2,
                                      scale=tuple(cfg.scale_range))
        self.warp = _SmoothWarp(*cfg.coarse_warp)
        self.photo = _Photometric(cfg.exposure)
        self.site = _SiteShift(cfg.site_shift)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        plane, kp = self.items[i]
        img = tv_tensors.Image(plane[None])
        if self.augment:
            img, kp = self.affine(img, tv_tensors.KeyPoints(kp, canvas_size=self.size))
            img, kp = self.warp(torch.as_tensor(img), torch.as_tensor(kp))
            img = self.site(self.photo(img))
        return _normalise(torch.as_tensor(img), self.spec), torch.as_tensor(kp)


class PatchSet(torch.utils.data.Dataset):
    """Full-resolution patches around jittered landmark positions, one item per (case, k)."""

    def __init__(self, cases: Sequence[Case], grays: Sequence[np.ndarray], spec: dict[str, Any],
                 coarse_spec: dict[str, Any], cfg: TrainConfig, augment: bool, stage: str = "refine") -> None:
        self.cases, self.grays, self.augment = cases, grays, augment
        jitter = cfg.context_jitter if stage == "context" and cfg.context_jitter is not None else cfg.refine_jitter
        self.spec, self.coarse_spec, self.jitter = spec, coarse_spec, jitter
        self.tail = cfg.refine_jitter_tail if stage == "refine" else (0.0, 0.0)
        self.patch_scale = cfg.patch_scale
        self.rotate = v2.RandomRotation(cfg.patch_rotation)
        self.site = _SiteShift(cfg.patch_site_shift)
        self.pairs = [(c, k) for c, case in enumerate(cases) for k in range(len(case.xy))
                      if np.isfinite(case.xy[k]).all()]  # no patch for a point marked missing
        self.photo = _Photometric(cfg.exposure)
        self.rng = np.random.default_rng(cfg.seed)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        c, k = self.pairs[i]
        case, gray = self.cases[c], self.grays[c]
        ph, pw = self.spec["size"]
        sh = image_box(gray.shape, self.coarse_spec).sh * self.spec["box_fraction"]
        centre = case.xy[k].astype(np.float64)
        scale = 1.0
        if self.augment:
            wide = self.tail[0] > 0 and self.rng.random() < self.tail[0]  # no draw: v2-v4 unchanged
            centre = centre + self.rng.normal(0, (self.tail[1] if wide else self.jitter) * sh, 2)
            scale = math.exp(self.rng.uniform(-self.patch_scale, self.patch_scale))
        patch = Box(float(centre[0]), float(centre[1]), sh * scale * pw / ph, sh * scale)
        plane = torch.from_numpy(warp(gray, patch, (pw, ph), antialias=self.spec.get("antialias", False))[None] / 255.0)
        kp = torch.tensor(patch.to_grid(case.xy[k:k + 1], (pw, ph)), dtype=torch.float32)
        if self.augment:
            img, kp = self.rotate(tv_tensors.Image(plane), tv_tensors.KeyPoints(kp, canvas_size=(ph, pw)))
            plane = self.site(self.photo(torch.as_tensor(img)))
        return _normalise(torch.as_tensor(plane), self.spec), torch.as_tensor(kp)[0], k


def _targets(net: LandmarkNet, kp_in: torch.Tensor, in_wh: tuple[int, int], sigma: float
             ) -> tuple[torch.Tensor, tuple[int, int]]:
    s = net.heatmap_stride
    hm_wh = (in_wh[0] // s, in_wh[1] // s)
    kp_hm = kp_in * torch.tensor([(hm_wh[0] - 1) / (in_wh[0] - 1), (hm_wh[1] - 1) / (in_wh[1] - 1)],
                                 device=kp_in.device)
    return encode_heatmaps(kp_hm, hm_wh, sigma), hm_wh


def run_stage(name: str, net: LandmarkNet, data: torch.utils.data.Dataset, in_wh: tuple[int, int],
              cfg: TrainConfig, epochs: int, batch_size: int, work: Path, validate: Callable[[], dict[str, float]],
              log: Callable[[dict[str, Any]], None], softmax: bool = True) -> None:
    """Train one net with AdamW + cosine schedule; resumes from ``work/<name>.ckpt``.

    Softmax nets learn by spatial cross-entropy, raw-heatmap nets (Sapiens) by MSE as in mmpose.
    """
    device = torch.device(cfg.device)
    net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True,
                                         drop_last=len(data) >= 2 * batch_size, num_workers=cfg.workers,
                                         worker_init_fn=_worker_init if cfg.workers else None)
    total = epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda it: min(1.0, (it + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(it, total) / total)))
    ema = torch.optim.swa_utils.AveragedModel(
        net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True
    ) if cfg.ema_decay > 0 else None
    ckpt, start = work / f"{name}.ckpt", 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True, map_location=device)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start = state["epoch"]
        if ema is not None:
            ema.load_state_dict(state["ema"])
    saved = time.time()
    for epoch in range(start, epochs):
        seed_everything(cfg.seed * 1000 + epoch, data)  # per-epoch seeds: resume == no stop
        net.train()
        t0, losses = time.time(), []
        for batch in loader:
            x, kp = batch[0].to(device), batch[1].to(device)
            weight = torch.isfinite(kp).all(-1).float()  # (B, K): 0 for points marked missing
            target, _ = _targets(net, torch.nan_to_num(kp), in_wh, cfg.sigma)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = net(x).float()
            if len(batch) == 3:  # patches: supervise only the patch's own landmark
                idx = batch[2].to(device)
                out, target = out[torch.arange(len(idx)), idx][:, None], target[:, None]
                weight = weight[:, None]
            loss = softmax_ce(out, target, weight) if softmax else masked_mse(out, target, weight)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(net)
            losses.append(loss.item())
        net.eval()
        record = {"stage": name, "epoch": epoch + 1, "loss": float(np.mean(losses)),
                  "lr": sched.get_last_lr()[0], "seconds": round(time.time() - t0, 1)}
        record.update(validate())
        log(record)
        if epoch + 1 == epochs or time.time() - saved >= cfg.checkpoint_every_s:
            with atomic_write(ckpt) as tmp:
                torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                            "epoch": epoch + 1, **({"ema": ema.state_dict()} if ema is not None else {})}, tmp)
            saved = time.time()
    if ema is not None:  # the checkpoint keeps the last raw weights beside the average
        net.load_state_dict(ema.module.state_dict())


def transfer(source: torch.nn.Module, target: torch.nn.Module) -> list[str]:
    """Copy every parameter/buffer of ``source`` whose name and shape match; returns the rest."""
    own, theirs = target.state_dict(), source.state_dict()
    keep = {k: v for k, v in theirs.items() if k in own and own[k].shape == v.shape}
    target.load_state_dict({**own, **keep})
    return sorted(set(own) - set(keep))


def _worker_init(worker_id: int) -> None:
    """A data-loader process draws its own augmentation (seeded from the epoch's seed)."""
    info = torch.utils.data.get_worker_info()
    seed_everything(info.seed % 2 ** 32, info.dataset)


def seed_everything(seed: int, data: Any = None) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if hasattr(data, "rng"):
        data.rng = np.random.default_rng(seed)


def point_errors(det: Any, cases: Sequence[Case], images: Sequence[Any] | None = None) -> np.ndarray:
    """(N, K) radial errors in mm (pixel spacing of each image) of a detector on annotated cases."""
    images = images if images is not None else [read_image(c.image, spacing=c.spacing) for c in cases]
    pred = np.stack([lm.xy for lm in det.detect_batch(images)])
    truth = np.stack([c.xy for c in cases])
    return radial_errors(pred, truth, np.array([im.spacing[0] for im in images]))


def mean_radial_error(det: Any, cases: Sequence[Case], images: Sequence[Any] | None = None) -> float:
    """MRE in mm of a detector on annotated cases."""
    return float(np.nanmean(point_errors(det, cases, images)))


def check_finetune(before: np.ndarray, after: np.ndarray) -> dict[str, Any]:
    """The Fine-tune check on held-back cases from the old and new model's point errors: accepted
    unless the new one is worse by more than the standard error of the paired difference (a
    handful of held-back cases cannot tell a small gain from noise: docs/benchmarks.md, round 8)."""
    ok = np.isfinite(before) & np.isfinite(after)
    diff = (after - before)[ok]
    noise = float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else 0.0
    mre_before, mre_after = float(before[ok].mean()), float(after[ok].mean())
    return {"mre_before_mm": mre_before, "mre_after_mm": mre_after, "noise_mm": noise,
            "accepted": mre_after <= mre_before + noise}


def net_specs(cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """Model-card entries (architecture + input framing) of every stage."""
    common = {"channels": 1, "mean": GRAY_MEAN, "std": GRAY_STD, "antialias": True,
              "activation": "softmax"}
    net = {"family": "unet", "encoder": cfg.encoder, "in_chans": 1, "out_stride": 2}
    local = {**net, "encoder": cfg.refine_encoder or cfg.encoder, "decoder_channels": list(cfg.refine_decoder),
             **({"encoder_depth": cfg.refine_depth} if cfg.refine_depth else {})}
    return {
        "coarse": {"net": {**net, "decoder_channels": list(cfg.coarse_decoder)},
                   "input": {**common, "size": list(cfg.coarse_size), "padding": 1.0,
                             "orientation": cfg.orientation}},
        "context": {"net": dict(local), "input": {**common, "size": list(cfg.context_size),
                                                  "box_fraction": cfg.context_fraction}},
        "refine": {"net": dict(local), "input": {**common, "size": list(cfg.refine_size),
                                                 "box_fraction": cfg.refine_fraction}},
    }


def fit(train_cases: Sequence[Case], val_cases: Sequence[Case], landmarks: Sequence[tuple[str, str]],
        out_dir: Path, cfg: TrainConfig, card: dict[str, Any] | None = None,
        init: Any = None, log_path: Path | None = None, reframe: Sequence[str] = ()) -> Path:
    """Train the stages in order (resumable in ``out_dir/work``), save the model to ``out_dir``.

    ``init`` is a `Detector` to fine-tune from: its stages keep their nets and framing (with a
    different landmark set, everything but the output layers is transferred); a stage it lacks
    is trained from scratch when its epoch count is > 0. A stage named in ``reframe`` keeps the
    init's weights but takes its input size and patch extent from ``cfg`` (the nets are fully
    convolutional).
    """
    from .backends import TorchBackend
    from .cards import STAGES
    from .checkpoints import save_model
    from .detector import Detector

    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    out_dir, t_start = Path(out_dir), time.time()
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    log_path = log_path or work / "log.jsonl"
    epochs = {"coarse": cfg.coarse_epochs, "context": cfg.context_epochs, "refine": cfg.refine_epochs}
    specs = net_specs(cfg)
    card = {**(card or {}), "landmarks": [{"name": n, "description": d} for n, d in landmarks]}
    nets: dict[str, LandmarkNet] = {}
    same_landmarks = init is not None and len(init.names) == len(landmarks)
    for stage in STAGES:
        card.pop(stage, None)
        if init is not None and stage in init.nets and stage in reframe:
            framing = {k: v for k, v in specs[stage]["input"].items() if k in ("size", "box_fraction")}
            card[stage] = {**init.card[stage], "input": {**init.card[stage]["input"], **framing}}
        if init is not None and stage in init.nets and same_landmarks:
            card.setdefault(stage, init.card[stage])
            nets[stage] = init.nets[stage]
        elif init is not None and stage in init.nets:  # another landmark set: new heads
            card.setdefault(stage, init.card[stage])
            nets[stage] = LandmarkNet({**init.card[stage]["net"], "num_keypoints": len(landmarks)})
            transfer(init.nets[stage], nets[stage])
        elif stage == "coarse" or epochs[stage] > 0:
            card[stage] = specs[stage]
            nets[stage] = LandmarkNet({**specs[stage]["net"], "num_keypoints": len(landmarks)})
    grays = [load_gray(c) for c in train_cases]
    val_images = [read_image(c.image, spacing=c.spacing) for c in val_cases]
    val_key = "val_mre_mm" if all(im.spacing_known for im in val_images) else "val_mre_px"  # hands
    seen = list(train_cases[::max(1, len(train_cases) // cfg.train_check)][:cfg.train_check]) if cfg.train_check else []
    seen_images = [read_image(c.image, spacing=c.spacing) for c in seen]

    def validate(upto: str) -> Callable[[], dict[str, float]]:
        """Validation MRE of the model as far as ``upto`` (later stages that are new are skipped)."""
        later_new = STAGES[STAGES.index(upto) + 1:]
        use = {s: n for s, n in nets.items()
               if not (s in later_new and (init is None or s not in init.nets))}

        def run() -> dict[str, float]:
            if not val_cases and not seen:
                return {}
            det = Detector(card, TorchBackend(use, cfg.device, cfg.threads, channels_last=False))
            out = {val_key: mean_radial_error(det, val_cases, val_images)} if val_cases else {}
            if seen:  # evenly spaced training images: how well the model fits what it learns from
                out[val_key.replace("val_", "train_")] = mean_radial_error(det, seen, seen_images)
            return out
        return run

    def log(record: dict[str, Any]) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        with open(log_path, "a") as f:
            f.write(line + "\n")

    cs = card["coarse"]["input"]
    for stage, net in nets.items():
        if epochs[stage] <= 0:
            continue
        spec = card[stage]["input"]
        if stage == "coarse":
            data, batch = CoarseSet(train_cases, grays, cs, True, cfg), cfg.batch_size
        else:
            data, batch = PatchSet(train_cases, grays, spec, cs, cfg, True, stage), cfg.refine_batch_size
        run_stage(stage, net, data, tuple(spec["size"][::-1]), cfg, epochs[stage], batch, work,
                  validate(stage), log, softmax=spec.get("activation") == "softmax")
    nets = {stage: net.cpu() for stage, net in nets.items()}  # calibrated and exported on the CPU
    card.pop("calibration", None)  # an inherited one would describe another model
    card.pop("shape", None)
    hand = [n for n, _ in landmarks] == [n for n, _ in HAND_37]
    if val_cases and (val_key == "val_mre_mm" or hand):  # every fit recalibrates its confidence
        from .evaluation import card_entries

        final = Detector(card, TorchBackend(nets, "cpu", cfg.threads, channels_last=False))
        complete = [c for c in train_cases if np.isfinite(c.xy).all()]  # shapes without missing points
        card.update(card_entries(final, np.stack([c.xy for c in complete]),
                                 [c for c in val_cases if np.isfinite(c.xy).all()], hand=hand))
    card["training"] = {**card.get("training", {}), "config": {
        k2: (list(v) if isinstance(v, tuple) else v) for k2, v in vars(cfg).items()},
        "train_cases": [c.case_id for c in train_cases], "val_cases": [c.case_id for c in val_cases],
        "wall_time_s": round(time.time() - t_start, 1), "torch": torch.__version__}
    return save_model(out_dir, card, nets)
