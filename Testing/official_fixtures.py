"""Synthetic Sapiens / MedSapiens state dicts in the exact official key layout."""
import torch

from MedSapiensLandmarksLib.model import SAPIENS_ARCHS

ARCH = "sapiens_tiny"
C = SAPIENS_ARCHS[ARCH]["embed_dim"]
DEPTH = SAPIENS_ARCHS[ARCH]["depth"]
MLP = SAPIENS_ARCHS[ARCH]["mlp_dim"]
HEAD = (16, 12)


def pretrain_state(seed=0):
    """Sapiens pretrain file layout (mmpretrain names, backbone. prefix stripped, cls slot)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05
    sd = {"cls_token": r(1, 1, C), "pos_embed": r(1, 1 + 64 * 64, C),
          "patch_embed.projection.weight": r(C, 3, 16, 16), "patch_embed.projection.bias": r(C),
          "ln1.weight": 1 + r(C), "ln1.bias": r(C)}
    for i in range(DEPTH):
        p = f"layers.{i}."
        sd.update({p + "ln1.weight": 1 + r(C), p + "ln1.bias": r(C),
                   p + "attn.qkv.weight": r(3 * C, C), p + "attn.qkv.bias": r(3 * C),
                   p + "attn.proj.weight": r(C, C), p + "attn.proj.bias": r(C),
                   p + "ln2.weight": 1 + r(C), p + "ln2.bias": r(C),
                   p + "ffn.layers.0.0.weight": r(MLP, C), p + "ffn.layers.0.0.bias": r(MLP),
                   p + "ffn.layers.1.weight": r(C, MLP), p + "ffn.layers.1.bias": r(C)})
    return sd


def head_state(k, seed=1):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1
    c1, c2 = HEAD
    return {"head.deconv_layers.0.weight": r(C, c1, 4, 4), "head.deconv_layers.3.weight": r(c1, c2, 4, 4),
            "head.conv_layers.0.weight": r(c2, c2, 1, 1), "head.conv_layers.0.bias": r(c2),
            "head.conv_layers.3.weight": r(c2, c2, 1, 1), "head.conv_layers.3.bias": r(c2),
            "head.final_layer.weight": r(k, c2, 1, 1), "head.final_layer.bias": r(k)}


def lora_state(seed=2):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(DEPTH):
        for name, rank, out in (("qkv", 4, 3 * C), ("proj", 8, C)):
            p = f"backbone.module.layers.{i}.attn.{name}."
            sd[p + "lora_down.weight"] = torch.randn(rank, C, generator=g) * 0.1
            sd[p + "lora_up.weight"] = torch.randn(out, rank, generator=g) * 0.1
    return sd
