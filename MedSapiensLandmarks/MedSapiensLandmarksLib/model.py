"""Landmark networks: image tensor -> K heatmaps.

Two families behind one interface (`LandmarkNet`, built from a config dict stored in the
model card):
- ``sapiens``: Meta's Sapiens ViT (timm ``VisionTransformer``) + the Sapiens heatmap head,
  the exact MedSapiens architecture (heatmaps at 1/4 of the input);
- ``unet``: a timm CNN encoder with a U-Net decoder, small enough to train and run on a CPU.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import timm
import torch
from torch import nn
from torch.nn import functional as F

# Sapiens backbone sizes (embed dim, depth, heads, MLP dim); "tiny"/"small" are CPU/test configs
# with the same structure.
SAPIENS_ARCHS: dict[str, dict[str, int]] = {
    "sapiens_0.3b": dict(embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096),
    "sapiens_0.6b": dict(embed_dim=1280, depth=32, num_heads=16, mlp_dim=5120),
    "sapiens_1b": dict(embed_dim=1536, depth=40, num_heads=24, mlp_dim=6144),
    "sapiens_2b": dict(embed_dim=1920, depth=48, num_heads=32, mlp_dim=7680),
    "sapiens_small": dict(embed_dim=384, depth=6, num_heads=6, mlp_dim=1536),
    "sapiens_tiny": dict(embed_dim=64, depth=2, num_heads=2, mlp_dim=128),
}
SAPIENS_HEAD_CHANNELS = (768, 768)


class SapiensBackbone(nn.Module):
    """Sapiens ViT: patch 16 with padding 2, no class token, qkv bias, final LayerNorm."""

    def __init__(self, arch: str, input_size: tuple[int, int] = (1024, 768)) -> None:
        super().__init__()
        if arch not in SAPIENS_ARCHS:
            raise ValueError(f"unknown Sapiens arch {arch!r}; known: {', '.join(SAPIENS_ARCHS)}")
        a = SAPIENS_ARCHS[arch]
        self.vit = timm.models.vision_transformer.VisionTransformer(
            img_size=input_size, patch_size=16, in_chans=3, num_classes=0, global_pool="",
            embed_dim=a["embed_dim"], depth=a["depth"], num_heads=a["num_heads"],
            mlp_ratio=a["mlp_dim"] / a["embed_dim"], qkv_bias=True, class_token=False,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), act_layer=nn.GELU,
        )
        # (H + 4 - 16) // 16 + 1 == H // 16 for H divisible by 16: the grid matches pos_embed.
        self.vit.patch_embed.proj.padding = (2, 2)
        self.grid = (input_size[0] // 16, input_size[1] // 16)
        self.out_channels = a["embed_dim"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(x)  # B, N, C
        b, n, c = tokens.shape
        return tokens.transpose(1, 2).reshape(b, c, *self.grid)


def _norm_act(channels: int) -> list[nn.Module]:
    return [nn.InstanceNorm2d(channels, affine=False), nn.SiLU()]


class SapiensHead(nn.Module):
    """Sapiens fork of mmpose's HeatmapHead: 2 deconvs, 2 1x1 convs, final 1x1 conv (x4 upsampling)."""

    def __init__(self, in_channels: int, num_keypoints: int,
                 channels: tuple[int, int] = SAPIENS_HEAD_CHANNELS) -> None:
        super().__init__()
        c1, c2 = channels
        self.deconv_layers = nn.Sequential(
            nn.ConvTranspose2d(in_channels, c1, 4, stride=2, padding=1, bias=False), *_norm_act(c1),
            nn.ConvTranspose2d(c1, c2, 4, stride=2, padding=1, bias=False), *_norm_act(c2))
        self.conv_layers = nn.Sequential(
            nn.Conv2d(c2, c2, 1), *_norm_act(c2), nn.Conv2d(c2, c2, 1), *_norm_act(c2))
        self.final_layer = nn.Conv2d(c2, num_keypoints, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_layer(self.conv_layers(self.deconv_layers(x)))


class _DecoderBlock(nn.Module):
    def __init__(self, in_ch: int, skip_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_ch + skip_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([x, skip], 1))


class UNetBackbone(nn.Module):
    """timm CNN encoder (features_only) + U-Net decoder up to ``out_stride`` of the input."""

    def __init__(self, encoder: str = "resnet18", in_chans: int = 1, out_stride: int = 2,
                 decoder_channels: tuple[int, ...] = (256, 128, 64, 32),
                 encoder_depth: int | None = None) -> None:
        super().__init__()
        # encoder_depth: how many feature levels of the encoder to build (default: all); a
        # small patch needs no stride-32 level.
        extra = {"out_indices": tuple(range(encoder_depth))} if encoder_depth else {}
        self.encoder = timm.create_model(encoder, features_only=True, in_chans=in_chans,
                                         pretrained=False, **extra)
        chans = self.encoder.feature_info.channels()
        strides = self.encoder.feature_info.reduction()
        if out_stride not in strides:
            raise ValueError(f"out_stride {out_stride} not among encoder strides {strides}")
        n_up = len(strides) - 1 - strides.index(out_stride)
        if len(decoder_channels) < n_up:
            raise ValueError(f"need {n_up} decoder channels, got {decoder_channels}")
        blocks, c = [], chans[-1]
        for i in range(n_up):
            skip = chans[-2 - i]
            blocks.append(_DecoderBlock(c, skip, decoder_channels[i]))
            c = decoder_channels[i]
        self.decoder = nn.ModuleList(blocks)
        self.out_channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        y = feats[-1]
        for i, block in enumerate(self.decoder):
            y = block(y, feats[-2 - i])
        return y


class LandmarkNet(nn.Module):
    """Backbone + heatmap head; ``config`` (JSON-able) fully describes the architecture."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = dict(config)
        k = config["num_keypoints"]
        family = config["family"]
        if family == "sapiens":
            self.backbone = SapiensBackbone(config["arch"], tuple(config["input_size"]))
            self.head = SapiensHead(self.backbone.out_channels, k,
                                    tuple(config.get("head_channels", SAPIENS_HEAD_CHANNELS)))
        elif family == "unet":
            self.backbone = UNetBackbone(config["encoder"], config.get("in_chans", 1),
                                         config.get("out_stride", 2),
                                         tuple(config.get("decoder_channels", (256, 128, 64, 32))),
                                         config.get("encoder_depth"))
            self.head = nn.Conv2d(self.backbone.out_channels, k, 1)
        else:
            raise ValueError(f"unknown model family {family!r}; expected 'sapiens' or 'unet'")

    @property
    def heatmap_stride(self) -> int:
        return 4 if self.config["family"] == "sapiens" else self.config.get("out_stride", 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
