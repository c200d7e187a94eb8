"""Training on a small synthetic problem: it learns, saves a loadable model, and resumes exactly."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from MedSapiensLandmarksLib import training
from MedSapiensLandmarksLib.detector import Detector
from MedSapiensLandmarksLib.datasets import Case
from MedSapiensLandmarksLib.imageio import read_image
from MedSapiensLandmarksLib.model import LandmarkNet

NAMES = [("P1", "bright disk"), ("P2", "dark disk")]


def make_cases(folder, n, seed=0):
    rng = np.random.default_rng(seed)
    cases = []
    yy, xx = np.mgrid[0:120, 0:96]
    for i in range(n):
        pts = np.c_[rng.uniform(15, 80, 2), rng.uniform(15, 105, 2)]
        img = np.full((120, 96), 100.0) + rng.normal(0, 5, (120, 96))
        img[(xx - pts[0, 0]) ** 2 + (yy - pts[0, 1]) ** 2 < 36] = 230
        img[(xx - pts[1, 0]) ** 2 + (yy - pts[1, 1]) ** 2 < 36] = 10
        path = folder / f"{i:03d}.png"
        sitk.WriteImage(sitk.GetImageFromArray(np.clip(img, 0, 255).astype(np.uint8)), str(path))
        cases.append(Case(path, pts, spacing=0.5))
    return cases


CFG = dict(coarse_size=(64, 48), refine_size=(32, 32), refine_fraction=0.2, coarse_epochs=2,
           refine_epochs=1, batch_size=2, refine_batch_size=4, threads=2, checkpoint_every_s=0)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return make_cases(tmp_path_factory.mktemp("synthetic"), 12)


@pytest.fixture(scope="module")
def trained(cases, tmp_path_factory):
    """One model for the tests that start from a trained one (8 + 3 epochs on 8 images, ~20 s).
    P2 is marked missing (NaN) on three of its training images: no patch, no loss there."""
    train = [training.Case(c.image, c.xy.copy(), c.spacing) for c in cases[:8]]
    for c in train[:3]:
        c.xy[1] = np.nan
    folder = tmp_path_factory.mktemp("trained")
    cfg = training.TrainConfig(**{**CFG, "coarse_epochs": 8, "refine_epochs": 3, "lr": 3e-3})
    return training.fit(train, cases[8:], NAMES, folder / "m", cfg)


def test_fit_finds_the_targets_it_was_trained_for(trained, cases):
    det = Detector.load(trained)
    assert det.names == ["P1", "P2"] and det.local_stages == ["refine"]
    meta = json.loads(trained.read_text())
    assert meta["training"]["train_cases"] == [f"{i:03d}" for i in range(8)]
    log = [json.loads(x) for x in (trained.parent / "work" / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == ["coarse"] * 8 + ["refine"] * 3
    assert all(np.isfinite(r["loss"]) for r in log)  # the missing points add no NaN
    # on 4 unseen images both disks are found to about 1-3.4 px (disk radius 6 px); the same
    # net untrained is 4 to 124 px off (mean 45 px) on these images
    err = np.array([np.linalg.norm(det.detect(read_image(c.image, spacing=0.5)).xy - c.xy, axis=1)
                    for c in cases[8:]])
    assert err.max() < 5.0 and err.mean() < 3.0, err.round(1)
    assert log[-1]["val_mre_mm"] == pytest.approx(err.mean() * 0.5, rel=0.05)


def test_validation_error_is_logged_in_pixels_when_the_spacing_is_unknown(tmp_path, cases):
    unknown = [training.Case(c.image, c.xy, None) for c in cases]  # PNG, no spacing given
    cfg = training.TrainConfig(**{**CFG, "coarse_epochs": 1, "refine_epochs": 0})
    training.fit(unknown[:6], unknown[6:], NAMES, tmp_path / "m", cfg)
    (record,) = [json.loads(x) for x in (tmp_path / "m" / "work" / "log.jsonl").read_text().splitlines()]
    assert "val_mre_mm" not in record and record["val_mre_px"] > 0


def test_the_error_on_training_images_is_logged_beside_validation(tmp_path, cases):
    cfg = training.TrainConfig(**{**CFG, "coarse_epochs": 1, "refine_epochs": 0, "train_check": 3})
    path = training.fit(cases[:6], cases[6:], NAMES, tmp_path / "m", cfg)
    (record,) = [json.loads(x) for x in (tmp_path / "m" / "work" / "log.jsonl").read_text().splitlines()]
    # the same model on training images 0, 2 and 4 (evenly spaced), measured afresh
    again = training.mean_radial_error(Detector.load(path, backend="torch"), [cases[0], cases[2], cases[4]])
    assert record["train_mre_mm"] == pytest.approx(again, rel=0.02) and record["val_mre_mm"] > 0


def test_context_stage_added_to_a_trained_model_runs_before_refine(tmp_path, cases, trained):
    base = Detector.load(trained, backend="torch")
    cfg = training.TrainConfig(**{**CFG, "coarse_epochs": 0, "refine_epochs": 0, "context_epochs": 1,
                                  "context_size": (32, 32), "context_fraction": 0.4})
    det = Detector.load(training.fit(cases[:6], cases[6:], NAMES, tmp_path / "ctx", cfg, init=base),
                        backend="torch")
    assert det.local_stages == ["context", "refine"]
    assert det.card["context"]["input"]["box_fraction"] == 0.4
    for stage in ("coarse", "refine"):  # the init model's stages are carried over unchanged
        for key, value in base.nets[stage].state_dict().items():
            assert torch.equal(det.nets[stage].state_dict()[key], value), key
    log = [json.loads(x) for x in (tmp_path / "ctx" / "work" / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == ["context"]
    lm = det.detect(read_image(cases[6].image, spacing=0.5))
    assert lm.xy.shape == (2, 2) and np.isfinite(lm.xy).all()


def test_loss_decreases_when_training_longer(tmp_path, cases):
    cfg = training.TrainConfig(**{**CFG, "coarse_epochs": 6, "refine_epochs": 0, "lr": 3e-3})
    training.fit(cases, [], NAMES, tmp_path / "m", cfg)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "m" / "work" / "log.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.8 * losses[0]


def test_interrupted_training_resumes_to_identical_weights(tmp_path, cases):
    cfg = training.TrainConfig(**CFG)
    grays = [training.load_gray(c) for c in cases[:4]]
    spec = training.net_specs(cfg)["coarse"]
    net_cfg = {**spec["net"], "num_keypoints": 2}

    def run(work, validate):
        training.seed_everything(0)
        net = LandmarkNet(net_cfg)
        data = training.CoarseSet(cases[:4], grays, spec["input"], True)
        training.run_stage("coarse", net, data, (48, 64), cfg, 3, 2, work, validate, lambda r: None)
        return net

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    straight = run(tmp_path / "a", lambda: {})
    calls = []

    def crash_on_second_epoch():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {}

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", crash_on_second_epoch)
    assert torch.load(tmp_path / "b" / "coarse.ckpt", weights_only=True)["epoch"] == 1
    resumed = run(tmp_path / "b", lambda: {})
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_init_from_another_landmark_set_transfers_all_but_the_heads(tmp_path, cases, trained):
    base = Detector.load(trained, backend="torch")
    one = [training.Case(c.image, c.xy[:1], c.spacing, c.split, c.case_id) for c in cases]
    cfg = training.TrainConfig(**{**CFG, "coarse_epochs": 1, "refine_epochs": 0, "lr": 0.0})
    det = Detector.load(training.fit(one[:6], [], NAMES[:1], tmp_path / "one", cfg, init=base),
                        backend="torch")
    assert det.names == ["P1"] and det.local_stages == ["refine"]
    got, src = det.nets["coarse"].state_dict(), base.nets["coarse"].state_dict()
    assert got["head.weight"].shape[0] == 1 and src["head.weight"].shape[0] == 2
    params = [k for k, _ in base.nets["coarse"].named_parameters() if not k.startswith("head.")]
    # lr 0: the transferred weights are exactly the init model's (stored as float16); batch-norm
    # running statistics move during the epoch, so only parameters are compared
    assert len(params) > 50 and all(torch.allclose(got[k].float(), src[k].float(), atol=1e-3) for k in params)


def test_reframed_stage_keeps_the_init_weights_and_takes_the_new_patch(tmp_path, cases, trained):
    base = Detector.load(trained, backend="torch")
    cfg = training.TrainConfig(**{**CFG, "coarse_epochs": 0, "refine_epochs": 0,
                                  "refine_size": (48, 48), "refine_fraction": 0.3})
    det = Detector.load(training.fit(cases[:6], cases[6:], NAMES, tmp_path / "wide", cfg, init=base,
                                     reframe=["refine"]), backend="torch")
    assert det.card["refine"]["input"]["size"] == [48, 48]
    assert det.card["refine"]["input"]["box_fraction"] == 0.3
    assert base.card["refine"]["input"]["size"] == [32, 32]  # the init model is left as it was
    for stage in ("coarse", "refine"):
        for key, value in base.nets[stage].state_dict().items():
            assert torch.equal(det.nets[stage].state_dict()[key], value), key
    lm = det.detect(read_image(cases[6].image, spacing=0.5))
    assert lm.xy.shape == (2, 2) and np.isfinite(lm.xy).all()


def test_data_loader_processes_draw_their_own_patch_jitter_reproducibly(cases):
    """With workers (the GPU path), each process reseeds its augmentation from the epoch's
    seed: no two processes repeat one jitter sequence, and a rerun draws the same patches."""
    cfg = training.TrainConfig(**{**CFG, "workers": 2, "patch_rotation": 0.0})  # jitter only
    specs = training.net_specs(cfg)
    same = [cases[0]] * 8  # one point of one image, eight times: only the jitter differs
    data = training.PatchSet(same, [training.load_gray(cases[0])] * 8, specs["refine"]["input"],
                             specs["coarse"]["input"], cfg, True)

    def targets():
        training.seed_everything(3, data)
        loader = torch.utils.data.DataLoader(data, batch_size=1, num_workers=2, worker_init_fn=training._worker_init)
        return np.array([kp.numpy().ravel() for _, kp, _ in loader])

    first = targets()
    assert len(np.unique(first.round(4), axis=0)) == len(first) == 16  # 8 cases x 2 points
    assert np.array_equal(first, targets())


def test_the_context_stage_draws_its_patch_centres_with_its_own_jitter(cases):
    """``context_jitter`` sets the spread of the context stage's patch centres (in patch heights),
    ``refine_jitter`` the patch stage's; unset, the context stage takes the patch stage's."""
    cfg = training.TrainConfig(**{**CFG, "refine_jitter": 0.25, "context_jitter": 0.05, "patch_rotation": 0.0,
                                  "patch_scale": 0.0, "context_size": (32, 32), "context_fraction": 0.2})
    specs = training.net_specs(cfg)
    gray = training.load_gray(cases[0])
    same = [cases[0]] * 300

    def spread(config, stage):
        data = training.PatchSet(same, [gray] * 300, specs[stage]["input"], specs["coarse"]["input"], config, True,
                                 stage)
        size = specs[stage]["input"]["size"][0]
        offsets = [(data[i][1].numpy() - (size - 1) / 2) / size for i in range(0, 600, 2)]  # point P1
        return np.std(offsets)

    assert spread(cfg, "context") == pytest.approx(0.05, rel=0.15)
    assert spread(cfg, "refine") == pytest.approx(0.25, rel=0.15)
    unset = training.TrainConfig(**{**vars(cfg), "context_jitter": None})
    assert spread(unset, "context") == pytest.approx(0.25, rel=0.15)


def test_a_share_of_patch_centres_comes_from_the_wide_tail(cases):
    """``refine_jitter_tail`` (share, std): that share of the patch stage's centres is drawn from
    the wider Gaussian, the rest from ``refine_jitter``; the context stage keeps its own jitter."""
    cfg = training.TrainConfig(**{**CFG, "refine_jitter": 0.02, "refine_jitter_tail": (0.3, 0.4),
                                  "patch_rotation": 0.0, "patch_scale": 0.0})
    specs = training.net_specs(cfg)
    gray = training.load_gray(cases[0])
    same = [cases[0]] * 600
    data = training.PatchSet(same, [gray] * 600, specs["refine"]["input"], specs["coarse"]["input"], cfg, True)
    size = specs["refine"]["input"]["size"][0]
    offsets = np.array([(data[i][1].numpy() - (size - 1) / 2) / size for i in range(0, 1200, 2)])
    far = np.abs(offsets).max(1) > 0.1  # 5 core std: only tail draws land there
    # P(tail) x P(max(|x|, |y|) > 0.1 | std 0.4) = 0.3 x (1 - erf(0.1 / (0.4 sqrt 2))^2) = 0.288
    assert far.mean() == pytest.approx(0.288, abs=0.06)
    assert np.std(offsets[~far]) == pytest.approx(0.02, rel=0.2)
    context = training.PatchSet(same, [gray] * 600, specs["refine"]["input"], specs["coarse"]["input"], cfg, True,
                                "context")
    near = np.array([(context[i][1].numpy() - (size - 1) / 2) / size for i in range(0, 1200, 2)])
    assert np.abs(near).max() < 0.1


def test_the_smooth_warp_moves_each_keypoint_with_the_image_content():
    """`_SmoothWarp`: a bright dot ends where its keypoint is moved to (the inverse of the
    sampling field), the points move by about ``std`` x the shorter side, and p = 0 is identity."""
    h, w = 256, 208
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    warp = training._SmoothWarp(1.0, 0.02)
    torch.manual_seed(0)
    miss, moved = [], []
    for x, y in np.random.default_rng(0).uniform([40, 40], [w - 40, h - 40], (40, 2)):
        dot = torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 1.5 ** 2))[None]
        out, kp = warp(dot, torch.tensor([[x, y]], dtype=torch.float32))
        weight = out[0] / out[0].sum()
        centroid = torch.stack([(weight * xs).sum(), (weight * ys).sum()])
        miss.append(float((centroid - kp[0]).norm()))
        moved.append(float((kp[0] - torch.tensor([x, y])).norm()))
    assert max(miss) < 0.3  # pixels
    # the 2-D displacement of std s per axis has a mean norm of s sqrt(pi / 2); the bicubic field
    # between control points is smoother than at them, so somewhat less
    assert 0.5 * 0.02 * w * 1.2533 < np.mean(moved) < 1.2 * 0.02 * w * 1.2533
    same, kp = training._SmoothWarp(0.0, 0.02)(dot, torch.tensor([[1.0, 2.0]]))
    assert same is dot and kp.tolist() == [[1.0, 2.0]]


def test_coarse_set_geometry_follows_the_config(cases):
    """The whole-image stage's rotation, shift and warp come from `TrainConfig`."""
    cfg = training.TrainConfig(**{**CFG, "coarse_rotation": 15.0, "coarse_translate": 0.08,
                                  "coarse_warp": (0.5, 0.015)})
    data = training.CoarseSet(cases[:1], [training.load_gray(cases[0])], training.net_specs(cfg)["coarse"]["input"],
                              True, cfg)
    assert list(data.affine.degrees) == [-15.0, 15.0] and tuple(data.affine.translate) == (0.08, 0.08)
    assert (data.warp.p, data.warp.std) == (0.5, 0.015)


def test_recipe_v5_is_v4_with_the_cross_validated_geometry_only():
    """v5 is what bench/crossval_coarse.py's ``strong`` variant measured: v4 plus rotation 15,
    shift 8 % and the smooth warp, nothing else; v5-640 changes only the whole-image size."""
    v4, v5, v5_640 = (vars(training.recipe(n)) for n in ("v4", "v5", "v5-640"))
    assert {k: v5[k] for k in v5 if v5[k] != v4[k]} == {
        "coarse_rotation": 15.0, "coarse_translate": 0.08, "coarse_warp": (0.5, 0.015)}
    assert {k: v5_640[k] for k in v5 if v5_640[k] != v5[k]} == {"coarse_size": (640, 512)}


def test_a_stage_with_ema_ends_on_the_moving_average_of_its_weights(tmp_path, cases):
    """``ema_decay`` d: after step t the average is d * avg + (1 - d) * w_t (the first step copies
    w_1); the stage ends with it, and the checkpoint keeps the raw weights beside it."""
    cfg = training.TrainConfig(**{**CFG, "ema_decay": 0.6, "lr": 2.0})  # warm-up: steps of 0.02-0.08
    specs = training.net_specs(cfg)
    net = LandmarkNet({**specs["coarse"]["net"], "num_keypoints": 2})
    data = training.CoarseSet(cases[:4], [training.load_gray(c) for c in cases[:4]], specs["coarse"]["input"],
                              True, cfg)
    seen = []
    hook = register_optimizer_step_post_hook(
        lambda *_: seen.append({k: v.detach().clone() for k, v in net.state_dict().items()}))
    try:
        training.run_stage("coarse", net, data, (48, 64), cfg, 2, 2, tmp_path, dict, lambda r: None)
    finally:
        hook.remove()
    assert len(seen) == 4  # 2 epochs x 2 batches
    key = "head.weight"
    expected = seen[0][key]
    for w in seen[1:]:
        expected = 0.6 * expected + 0.4 * w[key]
    assert torch.allclose(net.state_dict()[key], expected, atol=1e-6)
    assert not torch.allclose(seen[-1][key], expected, atol=1e-4)  # the average is not the last step
    state = torch.load(tmp_path / "coarse.ckpt", weights_only=True)
    assert torch.equal(state["net"][key], seen[-1][key])
    running = "backbone.decoder.0.conv.1.running_mean"  # batch-norm statistics are averaged too
    assert not torch.allclose(net.state_dict()[running], seen[-1][running])


def test_the_finetune_check_accepts_unless_worse_beyond_its_own_noise():
    before = np.full((2, 4), 2.0)
    # worse by 0.1 mm on average, paired differences 0.3, -0.1, 0.3, -0.1, ...: SD 0.2138, SE 0.0756
    small = before + np.array([0.3, -0.1] * 4).reshape(2, 4)
    check = training.check_finetune(before, small)
    assert check["mre_after_mm"] == pytest.approx(2.1) and check["noise_mm"] == pytest.approx(0.2138 / np.sqrt(8),
                                                                                              abs=1e-4)
    assert not check["accepted"]  # 0.1 > 0.0756
    noisy = before + np.array([0.5, -0.3] * 4).reshape(2, 4)  # the same mean, SE 0.1512
    assert training.check_finetune(before, noisy)["accepted"]
    assert training.check_finetune(before, before - 0.2)["accepted"]  # better: SE 0
    missing = small.copy()
    missing[0, 0] = np.nan  # a point marked missing is left out of both models' errors
    check = training.check_finetune(before, missing)
    assert check["mre_before_mm"] == 2.0 and check["mre_after_mm"] == pytest.approx(2.0 + 0.5 / 7)
