"""Synthetic Sapiens / MedSapiens state dicts in the exact official key layout."""
import sys
import types

import numpy as np
import torch

from MedSapiensLandmarksLib.model import SAPIENS_ARCHS

ARCH = "sapiens_tiny"
C = SAPIENS_ARCHS[ARCH]["embed_dim"]
DEPTH = SAPIENS_ARCHS[ARCH]["depth"]
MLP = SAPIENS_ARCHS[ARCH]["mlp_dim"]
HEAD = (16, 12)


def mae_sincos_table(grid=64, dim=C):
    """MAE's fixed position table, written out as in the original numpy code
    (get_2d_sincos_pos_embed, cls_token=True), independently of the loader's own."""
    gh = np.arange(grid, dtype=np.float32)
    gw = np.arange(grid, dtype=np.float32)
    g = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, grid, grid)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)
    return torch.from_numpy(np.concatenate([np.zeros((1, dim)), emb])[None].astype(np.float32))


def pretrain_state(seed=0):
    """Sapiens pretrain file layout (mmpretrain names, backbone. prefix stripped, cls slot)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05
    sd = {"cls_token": r(1, 1, C), "pos_embed": mae_sincos_table(),
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


MM_CLASSES = ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer")


class HistoryBuffer:
    """Pickled under mmengine's own path, as a real MedSapiens checkpoint holds it."""

    def __init__(self, values):
        self._log_history = np.asarray(values, dtype=np.float64)
        self._count_history = np.ones(len(values), dtype=np.float64)
        self.max_length = 1000000


HistoryBuffer.__module__ = "mmengine.logging.history_buffer"


def save_mmengine(path, state_dict, num_keypoints, config_text=""):
    """torch.save in mmengine's checkpoint layout (meta with numpy dataset_meta, message hub of
    HistoryBuffer objects, optimizer state), without mmengine installed."""
    module = types.ModuleType("mmengine.logging.history_buffer")
    module.HistoryBuffer = HistoryBuffer
    saved = {name: sys.modules.get(name) for name in MM_CLASSES}
    sys.modules.update({"mmengine": types.ModuleType("mmengine"),
                        "mmengine.logging": types.ModuleType("mmengine.logging"),
                        "mmengine.logging.history_buffer": module})
    try:
        k = num_keypoints
        checkpoint = {
            "meta": {"epoch": 210, "iter": 4410, "cfg": config_text, "seed": 0,
                     "experiment_name": "medsapiens_0.3b", "mmengine_version": "0.10.4",
                     "dataset_meta": {"dataset_name": "med_sapien", "num_keypoints": k,
                                      "keypoint_id2name": {i: f"kp{i}" for i in range(k)},
                                      "flip_indices": list(range(k)), "flip_pairs": [],
                                      "sigmas": np.full(k, 0.025, dtype=np.float32),
                                      "joint_weights": np.ones(k, dtype=np.float32),
                                      "skeleton_links": [], "dtype": np.dtype(np.float32),
                                      # mmpose's parse_pose_metainfo for a set without a skeleton
                                      # (every medical set): empty uint8 arrays, pickled by
                                      # protocol 2 as a call of `bytes`
                                      "keypoint_colors": np.zeros((k, 3), dtype=np.uint8),
                                      "skeleton_link_colors": np.array([], dtype=np.uint8),
                                      "dataset_keypoint_weights": np.ones(k, dtype=np.float32),
                                      "upper_body_ids": [], "lower_body_ids": []}},
            "state_dict": state_dict,
            "message_hub": {"log_scalars": {"train/loss": HistoryBuffer([0.5, 0.4]),
                                            "train/lr": HistoryBuffer([1e-4])},
                            "runtime_info": {"epoch": 210, "iter": 4410, "best_score": np.float64(1.23)},
                            "resumed_keys": {"epoch": False}},
            "optimizer": {"state": {0: {"step": torch.tensor(4410.0), "exp_avg": torch.zeros(2)}},
                          "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]},
        }
        torch.save(checkpoint, path)
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod
