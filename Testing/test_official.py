"""Official Sapiens / MedSapiens checkpoints, built synthetically in the exact key layout."""
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from MedSapiensLandmarksLib.errors import CheckpointError
from MedSapiensLandmarksLib.model import SAPIENS_ARCHS, LandmarkNet
from MedSapiensLandmarksLib.detector import Detector
from MedSapiensLandmarksLib.official import resize_pos_embed

from official_fixtures import ARCH, C, DEPTH, head_state, lora_state, pretrain_state, save_mmengine


def keys_bicubic_resize_cols(table, out_w):
    """Independent numpy 1-D cubic convolution (Keys, a=-0.75, half-pixel centres, edge clamp)."""
    a = -0.75

    def kern(t):
        t = abs(t)
        if t <= 1:
            return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
        if t < 2:
            return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
        return 0.0

    in_w = table.shape[1]
    out = np.zeros((table.shape[0], out_w, table.shape[2]))
    for j in range(out_w):
        src = (j + 0.5) * in_w / out_w - 0.5
        base = int(np.floor(src))
        for tap in range(base - 1, base + 3):
            out[:, j] += kern(src - tap) * table[:, min(max(tap, 0), in_w - 1)]
    return out


def test_pos_embed_resize_matches_independent_bicubic():
    pos = torch.randn(1, 1 + 64 * 64, 8, dtype=torch.float64)
    got = resize_pos_embed(pos, (64, 48)).reshape(64, 48, 8).numpy()
    expected = keys_bicubic_resize_cols(pos[0, 1:].reshape(64, 64, 8).numpy(), 48)
    assert np.abs(got - expected).max() < 5e-5  # float32 arithmetic
    # antialias=True (timm's own default) would differ: the notes insist on antialias=False
    aa = F.interpolate(pos[:, 1:].reshape(1, 64, 64, 8).permute(0, 3, 1, 2), size=(64, 48),
                       mode="bicubic", align_corners=False, antialias=True)
    assert np.abs(aa.permute(0, 2, 3, 1)[0].numpy() - expected).max() > 1e-3


def _reference_forward(x, sd, heads):
    """Plain-torch Sapiens forward from mmpretrain-named tensors (no timm)."""
    t = F.conv2d(x, sd["patch_embed.projection.weight"], sd["patch_embed.projection.bias"], stride=16, padding=2)
    b, c, gh, gw = t.shape
    t = t.flatten(2).transpose(1, 2) + resize_pos_embed(sd["pos_embed"], (gh, gw))
    nh = SAPIENS_ARCHS[ARCH]["num_heads"]
    for i in range(DEPTH):
        p = f"layers.{i}."
        h = F.layer_norm(t, (C,), sd[p + "ln1.weight"], sd[p + "ln1.bias"], eps=1e-6)
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]) + heads.get((i, "qkv"), lambda z: 0)(h)
        q, k, v = qkv.reshape(b, -1, 3, nh, C // nh).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / (C // nh) ** 0.5, -1) @ v
        att = att.transpose(1, 2).reshape(b, -1, C)
        t = t + F.linear(att, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"]) + heads.get((i, "proj"), lambda z: 0)(att)
        h = F.layer_norm(t, (C,), sd[p + "ln2.weight"], sd[p + "ln2.bias"], eps=1e-6)
        t = t + F.linear(F.gelu(F.linear(h, sd[p + "ffn.layers.0.0.weight"], sd[p + "ffn.layers.0.0.bias"])),
                         sd[p + "ffn.layers.1.weight"], sd[p + "ffn.layers.1.bias"])
    t = F.layer_norm(t, (C,), sd["ln1.weight"], sd["ln1.bias"], eps=1e-6)
    return t.transpose(1, 2).reshape(b, C, gh, gw)


def _reference_head(f, hd, rows=slice(None)):
    inorm = lambda z: F.silu(F.instance_norm(z))
    f = inorm(F.conv_transpose2d(f, hd["head.deconv_layers.0.weight"], stride=2, padding=1))
    f = inorm(F.conv_transpose2d(f, hd["head.deconv_layers.3.weight"], stride=2, padding=1))
    f = inorm(F.conv2d(f, hd["head.conv_layers.0.weight"], hd["head.conv_layers.0.bias"]))
    f = inorm(F.conv2d(f, hd["head.conv_layers.3.weight"], hd["head.conv_layers.3.bias"]))
    return F.conv2d(f, hd["head.final_layer.weight"][rows], hd["head.final_layer.bias"][rows])


@pytest.fixture(scope="module")
def x():
    return torch.randn(1, 3, 1024, 768, generator=torch.Generator().manual_seed(5))


def test_lora_checkpoint_equals_explicit_lora_forward(tmp_path, x):
    pre, lora, hd = pretrain_state(), lora_state(), head_state(19)
    torch.save(pre, tmp_path / "sapiens_tiny_epoch_1_clean.pth")
    save_mmengine(tmp_path / "best_EPE.pth", {**lora, **hd}, 19)
    det = Detector.load(tmp_path / "best_EPE.pth")
    assert det.card["coarse"]["net"]["arch"] == ARCH and len(det.names) == 19 and det.names[0] == "S"

    def lora_fn(i, name):
        p = f"backbone.module.layers.{i}.attn.{name}."
        return lambda z: F.linear(F.linear(z, lora[p + "lora_down.weight"]), lora[p + "lora_up.weight"])

    heads = {(i, n): lora_fn(i, n) for i in range(DEPTH) for n in ("qkv", "proj")}
    with torch.no_grad():
        expected = _reference_head(_reference_forward(x, pre, heads), hd)
        got = det.nets["coarse"](x)
    assert got.shape == (1, 19, 256, 192)
    assert torch.allclose(got, expected, atol=2e-4), (got - expected).abs().max()


MEDSAPIENS_LORA_CFG = """model = dict(
    backbone=dict(
        type='mmpretrain.LoRAModel',
        module=dict(type='mmpretrain.VisionTransformer', arch=model_name, qkv_bias=True),
        alpha=4, rank=4,
        drop_rate=0.1,
        targets=[
            dict(type='.*qkv'),
            dict(type='proj', alpha=8, rank=8),
        ]))
"""


def test_lora_scales_come_from_the_checkpoint_config(tmp_path, x):
    from MedSapiensLandmarksLib.official import lora_scales_from_config

    assert lora_scales_from_config(MEDSAPIENS_LORA_CFG) == {"qkv": 1.0, "proj": 1.0}
    assert lora_scales_from_config("model = dict(backbone=dict(type='VisionTransformer'))") is None
    cfg = MEDSAPIENS_LORA_CFG.replace("alpha=4, rank=4", "alpha=8, rank=4").replace("alpha=8, rank=8", "alpha=4, rank=8")
    pre, lora, hd = pretrain_state(), lora_state(), head_state(19)
    torch.save(pre, tmp_path / "sapiens_tiny_epoch_1_clean.pth")
    save_mmengine(tmp_path / "best_EPE.pth", {**lora, **hd}, 19, config_text=cfg)
    det = Detector.load(tmp_path / "best_EPE.pth")
    assert det.card["lora_scales"] == {"qkv": 2.0, "proj": 0.5}

    def lora_fn(i, name, scale):
        p = f"backbone.module.layers.{i}.attn.{name}."
        return lambda z: scale * F.linear(F.linear(z, lora[p + "lora_down.weight"]), lora[p + "lora_up.weight"])

    heads = {(i, n): lora_fn(i, n, s) for i in range(DEPTH) for n, s in (("qkv", 2.0), ("proj", 0.5))}
    with torch.no_grad():
        expected = _reference_head(_reference_forward(x, pre, heads), hd)
        got = det.nets["coarse"](x)
    assert torch.allclose(got, expected, atol=2e-4), (got - expected).abs().max()


def test_full_finetune_checkpoint_and_multidataset_split(tmp_path, x):
    pre, hd = pretrain_state(seed=3), head_state(88, seed=4)
    full = {f"backbone.{k}": v for k, v in pre.items() if k != "cls_token"}
    full["backbone.pos_embed"] = resize_pos_embed(pre["pos_embed"], (64, 48))  # [1, 3072, C]
    save_mmengine(tmp_path / "best_EPE_epoch_199.pth", {**full, **hd}, 88)
    with pytest.raises(CheckpointError, match=r"88 channels.*head, chest, hand, leg.*none was given"):
        Detector.load(tmp_path / "best_EPE_epoch_199.pth")
    with pytest.raises(CheckpointError, match=r"'foot' is not one of them"):
        Detector.load(tmp_path / "best_EPE_epoch_199.pth", anatomy="foot")
    det = Detector.load(tmp_path / "best_EPE_epoch_199.pth", anatomy="hand")
    assert len(det.names) == 37 and det.card["name"].endswith("hand") and det.names[0] == "Hand_Point1"
    chest = Detector.load(tmp_path / "best_EPE_epoch_199.pth", anatomy="chest")
    assert chest.names == [f"Chest_Point{i}" for i in range(1, 7)]
    with torch.no_grad():
        expected = _reference_head(_reference_forward(x, pre, {}), hd, rows=slice(25, 62))
        got = det.nets["coarse"](x)
    assert torch.allclose(got, expected, atol=2e-4)


def test_lora_only_without_pretrain_names_the_missing_file(tmp_path):
    torch.save({"state_dict": {**lora_state(), **head_state(19)}}, tmp_path / "ckpt.pth")
    with pytest.raises(CheckpointError, match="only LoRA weights.*pretrain"):
        Detector.load(tmp_path / "ckpt.pth")


def test_lora_base_is_found_by_size_and_checked(tmp_path, capsys):
    pre, lora, hd = pretrain_state(), lora_state(), head_state(19)
    save_mmengine(tmp_path / "best_EPE.pth", {**lora, **hd}, 19)
    other = {k: v[..., :8] if k == "pos_embed" else v for k, v in pre.items()}  # a narrower model
    torch.save(other, tmp_path / "sapiens_0.3b_epoch_1600_clean.pth")  # wrong size for tiny LoRA
    with pytest.raises(CheckpointError, match=r"needs the Sapiens pretrain file sapiens_tiny_epoch_<n>_clean.pth"):
        Detector.load(tmp_path / "best_EPE.pth")
    # the right width but not the MAE table (e.g. a fine-tuned backbone): refused, file named
    tuned = dict(pre, pos_embed=pre["pos_embed"] + 0.01)
    torch.save(tuned, tmp_path / "sapiens_tiny_epoch_1_clean.pth")
    with pytest.raises(CheckpointError, match=r"sapiens_tiny_epoch_1_clean.pth: not the Sapiens MAE pretrain"):
        Detector.load(tmp_path / "best_EPE.pth")
    torch.save(pre, tmp_path / "sapiens_tiny_epoch_1_clean.pth")
    det = Detector.load(tmp_path / "best_EPE.pth")
    assert det.card["pretrain"] == str(tmp_path / "sapiens_tiny_epoch_1_clean.pth")
    torch.save(pre, tmp_path / "sapiens_tiny_epoch_2_clean.pth")  # two candidates: ask
    with pytest.raises(CheckpointError, match=r"2 are \(sapiens_tiny_epoch_1_clean.pth, sapiens_tiny_epoch_2"):
        Detector.load(tmp_path / "best_EPE.pth")
    assert Detector.load(tmp_path / "best_EPE.pth", pretrain=tmp_path / "sapiens_tiny_epoch_2_clean.pth")


def test_missing_and_unexpected_keys_are_named(tmp_path):
    pre = pretrain_state()
    full = {f"backbone.{k}": v for k, v in pre.items() if k not in ("cls_token", "layers.1.ln2.bias")}
    hd = head_state(19)
    del hd["head.conv_layers.3.bias"]
    hd["head.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": {**full, **hd}}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        Detector.load(tmp_path / "bad.pth")
    msg = str(err.value)
    assert "vit.blocks.1.norm2.bias" in msg and "head.conv_layers.3.bias" in msg and "head.extra.weight" in msg


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_mmengine_checkpoint_with_a_foreign_class_is_refused(tmp_path):
    """Only mmengine's HistoryBuffer is stood in for: any other class in meta is refused."""
    hooks = types.ModuleType("mmengine.hooks")
    hooks.Hook = type("Hook", (), {"__module__": "mmengine.hooks"})
    sys.modules.update({"mmengine": types.ModuleType("mmengine"), "mmengine.hooks": hooks})
    try:
        torch.save({"meta": {"hook": hooks.Hook()}, "state_dict": head_state(19)}, tmp_path / "hooked.pth")
    finally:
        del sys.modules["mmengine.hooks"], sys.modules["mmengine"]
    with pytest.raises(CheckpointError, match="refused or unreadable"):
        Detector.load(tmp_path / "hooked.pth")


def test_pickled_callable_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": _Payload(str(marker))}, f)
    with pytest.raises(CheckpointError, match="refused or unreadable"):
        Detector.load(tmp_path / "evil.pth")
    assert not marker.exists()


class _HugeBytes:
    """Pickles as ``bytes(2**40)``: the call the empty-array allowance must not open up."""

    def __reduce__(self):
        return bytes, (2 ** 40,)


def test_mmengine_meta_with_empty_arrays_loads_and_bytes_calls_stay_refused(tmp_path):
    from MedSapiensLandmarksLib.official import read_checkpoint

    save_mmengine(tmp_path / "best.pth", head_state(19), 19, config_text="model = dict()")
    _, meta = read_checkpoint(tmp_path / "best.pth")  # was "Unsupported global: GLOBAL bytes"
    colours = meta["dataset_meta"]["skeleton_link_colors"]
    assert colours.dtype == np.uint8 and colours.size == 0 and meta["cfg"] == "model = dict()"
    torch.save({"meta": {"x": _HugeBytes()}, "state_dict": head_state(19)}, tmp_path / "huge.pth")
    with pytest.raises(CheckpointError, match="refused or unreadable"):
        read_checkpoint(tmp_path / "huge.pth")


def test_sapiens_configs_match_the_published_sizes():
    net = LandmarkNet({"family": "sapiens", "arch": "sapiens_0.3b", "input_size": [1024, 768],
                       "num_keypoints": 19})
    n_backbone = sum(p.numel() for p in net.backbone.parameters())
    assert 0.30e9 < n_backbone < 0.32e9  # Sapiens-0.3B: ~0.3 B parameters
    assert net.backbone.vit.patch_embed.proj.padding == (2, 2)
    assert net.backbone.vit.pos_embed.shape == (1, 64 * 48, 1024)
    names = set(net.state_dict())
    assert {"head.deconv_layers.0.weight", "head.deconv_layers.3.weight", "head.conv_layers.0.bias",
            "head.conv_layers.3.weight", "head.final_layer.weight"} <= names


def test_official_models_flip_test_by_default_as_the_explicit_average(tmp_path):
    """mmpose flip_test=True, flip_mode='heatmap', shift_heatmap=False, identity flip pairs."""
    pre, hd = pretrain_state(seed=3), head_state(19, seed=4)
    full = {f"backbone.{k}": v for k, v in pre.items() if k != "cls_token"}
    save_mmengine(tmp_path / "full.pth", {**full, **hd}, 19)
    det = Detector.load(tmp_path / "full.pth")
    assert det.card["coarse"]["input"]["flip_test"] is True
    x = np.random.default_rng(0).standard_normal((1, 3, 1024, 768)).astype(np.float32)
    plain = det.backend.run("coarse", x)
    mirrored = det.backend.run("coarse", np.ascontiguousarray(x[..., ::-1]))
    expected = 0.5 * (plain + mirrored[..., ::-1])
    got, _ = det._heatmaps("coarse", x)
    assert np.allclose(got, expected, atol=1e-5) and not np.allclose(got, plain, atol=1e-3)
    assert Detector.load(tmp_path / "full.pth", flip=False).card["coarse"]["input"]["flip_test"] is False
