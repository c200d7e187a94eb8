"""Official Sapiens / MedSapiens checkpoints (.pth) -> model card + torch net.

- Sapiens pretrain (``sapiens_<size>_epoch_<n>_clean.pth``): MAE encoder with mmpretrain names
  and a 64x64 (+ class slot) sin-cos position table, resized to 64x48 like the original.
- MedSapiens (mmpose top-down) checkpoints: either LoRA-only backbone weights
  (``backbone.module.layers.<i>.attn.{qkv,proj}.lora_{down,up}.weight``) plus ``head.*`` - the
  backbone is then rebuilt from the pretrain file and LoRA merged - or a full fine-tune
  (``backbone.layers.*``). The 88-channel multi-dataset head is split into its landmark sets.
"""
from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from .checkpoints import load_state
from .errors import CheckpointError
from .landmarks import CEPH_19, HAND_37, MEDSAPIENS_MULTI, numbered
from .model import SAPIENS_ARCHS, LandmarkNet

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
INPUT_SIZE = (1024, 768)
_LAYER_RENAMES = [
    (re.compile(r"^patch_embed\.projection\."), "patch_embed.proj."),
    (re.compile(r"^layers\.(\d+)\.ln1\."), r"blocks.\1.norm1."),
    (re.compile(r"^layers\.(\d+)\.ln2\."), r"blocks.\1.norm2."),
    (re.compile(r"^layers\.(\d+)\.attn\."), r"blocks.\1.attn."),
    (re.compile(r"^layers\.(\d+)\.ffn\.layers\.0\.0\."), r"blocks.\1.mlp.fc1."),
    (re.compile(r"^layers\.(\d+)\.ffn\.layers\.1\."), r"blocks.\1.mlp.fc2."),
    (re.compile(r"^ln1\."), "norm."),  # final norm; anchored so layers.i.ln1 never matches
]
_LORA = re.compile(r"^(?:backbone\.)?(?:module\.)?layers\.(\d+)\.attn\.(qkv|proj)\.lora_(down|up)\.weight$")


class _MmengineObject:
    """Stand-in for mmengine's classes in a checkpoint's ``meta`` (``HistoryBuffer`` of the
    message hub): unpickled as inert attribute bags, never imported or run."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})


def _stand_in(module: str, name: str) -> type:
    cls = type(name, (_MmengineObject,), {"__module__": module})
    cls.__qualname__ = name
    return cls


# What an mmengine checkpoint's meta may hold besides tensors: numpy arrays, scalars and dtypes
# (dataset_meta), and mmengine's own HistoryBuffer. Classes only: no callable that acts.
def _numpy_globals() -> list[Any]:
    import numpy as np

    try:  # numpy 2 (numpy.core is its deprecated alias)
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray

    out: list[Any] = [np.ndarray, np.dtype]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1 / numpy 2 files
        out += [(multiarray._reconstruct, f"{module}._reconstruct"), (multiarray.scalar, f"{module}.scalar")]
    out += [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32,
                                        np.int64, np.uint8, np.uint16, np.bool_, np.str_)]
    return out


def _empty_bytes(*args: Any) -> bytes:
    """``bytes`` as protocol-2 pickles call it for an empty buffer (the data of an empty numpy
    array, e.g. mmpose's ``skeleton_link_colors`` of a set without a skeleton); non-empty
    buffers come as ``_codecs.encode``. Any argument is refused: nothing else is built."""
    if args:
        raise pickle.UnpicklingError("bytes(...) with arguments is not allowed in a checkpoint")
    return b""


SAFE_GLOBALS = [_stand_in("mmengine.logging.history_buffer", "HistoryBuffer"), (_empty_bytes, "builtins.bytes")]


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """State dict and mmengine ``meta`` of a .pth, read without running pickled code (``weights_only``).

    mmengine checkpoints (``{"meta", "state_dict", "message_hub", ...}``) are allowed numpy
    arrays/dtypes and mmengine's HistoryBuffer (as an inert stand-in) besides tensors; any
    other class or callable is refused.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with torch.serialization.safe_globals([*_numpy_globals(), *SAFE_GLOBALS]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError,
            AttributeError, TypeError, ValueError) as err:
        msg = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: refused or unreadable checkpoint ({msg})") from None
    meta = obj.get("meta") if isinstance(obj, dict) and isinstance(obj.get("meta"), dict) else {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict)")
    return obj, meta


def lora_scales_from_config(text: str) -> dict[str, float] | None:
    """alpha / rank of the qkv and proj LoRA layers from a MedSapiens config (mmengine keeps
    its text in ``meta['cfg']``): ``type='mmpretrain.LoRAModel' ... alpha=4, rank=4,
    targets=[dict(type='.*qkv'), dict(type='proj', alpha=8, rank=8)]``; None if absent."""
    model = re.search(r"mmpretrain\.LoRAModel", text)
    if not model:
        return None
    tail = text[model.end():]
    default = {k: float(v) for k, v in re.findall(r"\b(alpha|rank)\s*=\s*([0-9.]+)", tail.split("targets")[0])}
    scales = {}
    for body in re.findall(r"dict\(\s*type\s*=\s*['\"]([^'\"]+)['\"]([^)]*)\)", tail):
        target, rest = body
        own = {k: float(v) for k, v in re.findall(r"\b(alpha|rank)\s*=\s*([0-9.]+)", rest)}
        alpha, rank = own.get("alpha", default.get("alpha")), own.get("rank", default.get("rank"))
        for name in ("qkv", "proj"):
            if alpha and rank and (re.fullmatch(target, f"layers.0.attn.{name}") or target.endswith(name)):
                scales[name] = alpha / rank
    return scales if set(scales) == {"qkv", "proj"} else None


def resize_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[1, (1+)N, C] table -> [1, gh*gw, C]: drop the class slot, bicubic, no antialias."""
    n, c = pos.shape[1], pos.shape[2]
    if n == grid[0] * grid[1]:
        return pos
    side = int(round((n - 1) ** 0.5))
    if side * side == n - 1:
        pos = pos[:, 1:]
    else:
        side = int(round(n ** 0.5))
        if side * side != n:
            raise CheckpointError(f"pos_embed with {n} tokens is neither square nor {grid[0]}x{grid[1]}")
    table = pos.reshape(1, side, side, c).permute(0, 3, 1, 2)
    table = F.interpolate(table.float(), size=grid, mode="bicubic", align_corners=False, antialias=False)
    return table.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], c).to(pos.dtype)


def backbone_state(state: dict[str, torch.Tensor], grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """mmpretrain ViT names (no ``backbone.`` prefix) -> our ``vit.*`` names."""
    out = {}
    for key, value in state.items():
        if key == "cls_token":
            continue
        if key == "pos_embed":
            out["vit.pos_embed"] = resize_pos_embed(value, grid)
            continue
        for pattern, repl in _LAYER_RENAMES:
            if pattern.search(key):
                key = pattern.sub(repl, key)
                break
        else:
            raise CheckpointError(f"unexpected backbone key {key!r} (not a Sapiens ViT weight)")
        out["vit." + key] = value
    return out


def infer_arch(embed_dim: int, depth: int) -> str:
    for name, a in SAPIENS_ARCHS.items():
        if a["embed_dim"] == embed_dim and a["depth"] == depth:
            return name
    raise CheckpointError(f"no Sapiens architecture has embed dim {embed_dim} and depth {depth}")


def merge_lora(state: dict[str, torch.Tensor], lora: dict[str, torch.Tensor],
               scales: dict[str, float]) -> None:
    """W += scale * up @ down for every LoRA pair (in place on our ``vit.*`` state)."""
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in lora.items():
        m = _LORA.match(key)
        if not m:
            raise CheckpointError(f"unexpected LoRA key {key!r}")
        pairs.setdefault((m.group(1), m.group(2)), {})[m.group(3)] = value
    for (layer, name), p in pairs.items():
        if set(p) != {"down", "up"}:
            raise CheckpointError(f"layer {layer} {name}: LoRA needs both lora_down and lora_up")
        target = f"vit.blocks.{layer}.attn.{name}.weight"
        if target not in state:
            raise CheckpointError(f"LoRA weight for {target}, which the backbone does not have")
        delta = scales[name] * (p["up"].double() @ p["down"].double())
        if delta.shape != state[target].shape:
            raise CheckpointError(f"{target}: LoRA update {tuple(delta.shape)} != weight "
                                  f"{tuple(state[target].shape)}")
        state[target] = (state[target].double() + delta).to(state[target].dtype)


def _landmarks_for(k: int, anatomy: str | None, head: dict[str, torch.Tensor], source: Path
                   ) -> tuple[list[tuple[str, str]], dict[str, torch.Tensor], str]:
    """Landmark names for a K-channel head; slices the 88-channel multi-dataset head to the
    chosen anatomy, which must then be given."""
    total = sum(len(v[1]) for v in MEDSAPIENS_MULTI.values())
    if k == total:
        if anatomy not in MEDSAPIENS_MULTI:
            given = f"{anatomy!r} is not one of them" if anatomy else "none was given"
            raise CheckpointError(f"{source}: a multi-dataset checkpoint ({total} channels) holds "
                                  f"{', '.join(MEDSAPIENS_MULTI)} landmarks; choose the anatomy "
                                  f"(--anatomy {'|'.join(MEDSAPIENS_MULTI)}): {given}")
        start, names = MEDSAPIENS_MULTI[anatomy]
        head = dict(head)
        for key in ("final_layer.weight", "final_layer.bias"):
            head[key] = head[key][start:start + len(names)]
        return names, head, anatomy
    known = {19: (CEPH_19, "head"), 37: (HAND_37, "hand")}
    names, name = known.get(k, (numbered("P", "point", k), anatomy or "custom"))
    return names, head, name


def load_official(path: str | Path, pretrain: str | Path | None = None, anatomy: str | None = None,
                  lora_scales: dict[str, float] | None = None, flip: bool = True
                  ) -> tuple[dict[str, Any], dict[str, LandmarkNet]]:
    """Card and net of an official MedSapiens checkpoint (see module docstring).

    ``flip``: heatmap flip test as the original inference config (``flip_test=True``,
    ``flip_mode='heatmap'``, ``shift_heatmap=False``); False halves the cost."""
    path = Path(path)
    state, meta = read_checkpoint(path)
    head = {k[5:]: v for k, v in state.items() if k.startswith("head.")}
    if "final_layer.weight" not in head:
        raise CheckpointError(f"{path}: no heatmap head (head.final_layer.weight); a Sapiens "
                              f"pretrain file is passed as the pretrain of a MedSapiens checkpoint")
    lora = {k: v for k, v in state.items() if _LORA.match(k)}
    full = {k[9:]: v for k, v in state.items() if k.startswith("backbone.") and k not in lora}
    grid = (INPUT_SIZE[0] // 16, INPUT_SIZE[1] // 16)
    if full:
        bb = backbone_state(full, grid)
    else:
        pretrain = Path(pretrain) if pretrain else find_pretrain(path, lora)
        pre = read_checkpoint(pretrain)[0]
        pre = {k[9:] if k.startswith("backbone.") else k: v for k, v in pre.items()}
        check_pretrain(pretrain, pre, lora)
        bb = backbone_state(pre, grid)
    qkv = bb.get("vit.blocks.0.attn.qkv.weight")
    if qkv is None:
        raise CheckpointError(f"{path}: backbone lacks layers.0.attn.qkv.weight")
    depth = 1 + max(int(k.split(".")[2]) for k in bb if k.startswith("vit.blocks."))
    arch = infer_arch(qkv.shape[1], depth)
    if lora:
        # scales: given > the checkpoint's own config text > alpha/rank = 1 (MedSapiens' configs)
        lora_scales = (lora_scales or lora_scales_from_config(str(meta.get("cfg", "")))
                       or {"qkv": 1.0, "proj": 1.0})
        merge_lora(bb, lora, lora_scales)
    k = head["final_layer.weight"].shape[0]
    names, head, anatomy = _landmarks_for(k, anatomy, head, path)
    head_channels = [head["deconv_layers.0.weight"].shape[1], head["deconv_layers.3.weight"].shape[1]]
    net_cfg = {"family": "sapiens", "arch": arch, "input_size": list(INPUT_SIZE),
               "num_keypoints": len(names), "head_channels": head_channels}
    net = LandmarkNet(net_cfg)
    load_state(net, {**{f"backbone.{k2}": v for k2, v in bb.items()},
                     **{f"head.{k2}": v for k2, v in head.items()}}, str(path))
    card = sapiens_card(net, names, f"medsapiens-{arch}-{anatomy}", str(path), flip)
    if pretrain is not None:
        card["pretrain"] = str(pretrain)
    if lora:
        card["lora_scales"] = lora_scales
    return card, {"coarse": net}


def _lora_dim(lora: dict[str, torch.Tensor]) -> int:
    """Embedding dimension the LoRA weights act on (columns of lora_down)."""
    return next(v.shape[1] for k, v in lora.items() if k.endswith("lora_down.weight"))


def find_pretrain(path: Path, lora: dict[str, torch.Tensor]) -> Path:
    """The Sapiens pretrain beside a LoRA-only checkpoint: ``sapiens_<size>_*.pth`` of the size
    whose embedding dimension the LoRA weights need; exactly one such file."""
    dim = _lora_dim(lora)
    sizes = [n.removeprefix("sapiens_") for n, a in SAPIENS_ARCHS.items() if a["embed_dim"] == dim]
    found = sorted(f for size in sizes for f in path.parent.glob(f"sapiens_{size}_*.pth"))
    wanted = " or ".join(f"sapiens_{size}_epoch_<n>_clean.pth" for size in sizes) or f"a {dim}-wide Sapiens"
    if len(found) != 1:
        why = "none is" if not found else f"{len(found)} are ({', '.join(f.name for f in found)})"
        raise CheckpointError(f"{path}: holds only LoRA weights for the backbone; it needs the Sapiens "
                              f"pretrain file {wanted} (embed dim {dim}), and {why} beside it: "
                              f"give it with --pretrain")
    return found[0]


def sincos_tables(grid: int, dim: int) -> list[torch.Tensor]:
    """The fixed 2-D sin-cos position tables an MAE pretrain may carry, [1, 1 + grid^2, dim]
    with a class slot of zeros: the original MAE code (``np.meshgrid`` "xy": column coordinate
    first) and mmpretrain's ``build_2d_sincos_position_embedding`` (``torch.meshgrid`` "ij":
    row coordinate first)."""
    pos = torch.arange(grid, dtype=torch.float64)
    row, col = torch.meshgrid(pos, pos, indexing="ij")
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)
    first, second = [torch.cat([(c.flatten()[:, None] * omega).sin(), (c.flatten()[:, None] * omega).cos()], 1)
                     for c in (col, row)]
    zero = torch.zeros(1, dim, dtype=torch.float64)
    return [torch.cat([zero, t])[None] for t in (torch.cat([first, second], 1), torch.cat([second, first], 1))]


def check_pretrain(file: Path, pre: dict[str, torch.Tensor], lora: dict[str, torch.Tensor]) -> None:
    """Refuse a base that is not the MAE pretrain of the width the LoRA weights need."""
    dim, pos = _lora_dim(lora), pre.get("pos_embed")
    if pos is None or tuple(pos.shape) != (1, 1 + 64 * 64, dim):
        shape = "no pos_embed" if pos is None else f"pos_embed {tuple(pos.shape)}"
        raise CheckpointError(f"{file}: not the Sapiens MAE pretrain for these LoRA weights (expected "
                              f"pos_embed (1, {1 + 64 * 64}, {dim}), found {shape})")
    if not any(torch.allclose(pos.double(), t, atol=1e-4) for t in sincos_tables(64, dim)):
        raise CheckpointError(f"{file}: not the Sapiens MAE pretrain: its position table is not the "
                              f"fixed 2-D sin-cos table (a fine-tuned or other backbone?)")


def sapiens_card(net: LandmarkNet, names: list[tuple[str, str]], name: str, source: str,
                 flip: bool = True) -> dict[str, Any]:
    """Model card of a Sapiens net with the official input framing and normalisation."""
    return {
        "name": name, "source": source,
        "coarse": {"net": net.config, "input": {"size": list(INPUT_SIZE), "padding": 1.25, "channels": 3,
                                                "mean": MEAN, "std": STD, "antialias": False,
                                                "activation": "none", "flip_test": flip}},
        "landmarks": [{"name": n, "description": d} for n, d in names],
    }
