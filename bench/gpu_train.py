"""Issue 27, the GPU path: train the whole-image stage from the data pack on a lent GPU.

On the device machine (torch, timm, torchvision, onnx there; SimpleITK not needed):

    PYTHONUNBUFFERED=1 python3 bench/gpu_train.py runs/gpu-pack.zip $OUT --recipe v2-800 --minutes 8

Trains the whole-image net of the recipe on ISBI 001-140 of the pack (bench/gpu_pack.py, 0.3
mm/pixel), validates it on 141-150 (whole-image stage alone, ten times in the run), and fits the
schedule to the time: one timed epoch sets the epoch count. Writes to OUT ``log.jsonl`` and the
net as float16 safetensors in files under 15 MiB (what the device tool brings back). Back on the
CPU machine one command makes the model folder (ONNX, float16), with the patch stage of a
shipped model, calibrated on full-resolution 141-150:

    python bench/gpu_train.py --export OUT runs/gpu-model ../shared/data/isbi2015-ceph [--patch-from ceph-isbi2015]

Both halves run on a CPU too (``--device cpu``, small ``--minutes``): that is how they are tested.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MedSapiensLandmarks"))
from MedSapiensLandmarksLib.backends import TorchBackend  # noqa: E402
from MedSapiensLandmarksLib.datasets import read_landmark_csv  # noqa: E402
from MedSapiensLandmarksLib.detector import Detector  # noqa: E402
from MedSapiensLandmarksLib.imageio import Radiograph  # noqa: E402
from MedSapiensLandmarksLib.landmarks import CEPH_19  # noqa: E402
from MedSapiensLandmarksLib.metrics import radial_errors  # noqa: E402
from MedSapiensLandmarksLib.model import LandmarkNet  # noqa: E402
from MedSapiensLandmarksLib.training import CoarseSet, net_specs, recipe, run_stage  # noqa: E402

SPACING, VAL_IDS, PART_BYTES = 0.3, {f"{i}" for i in range(141, 151)}, 15 * 2 ** 20


def load_pack(pack: Path, folder: Path) -> tuple[list, list[np.ndarray]]:
    with zipfile.ZipFile(pack) as zf:
        zf.extractall(folder)
    cases = sorted(read_landmark_csv(folder / "isbi" / "train_senior.csv", folder / "isbi" / "images",
                                     spacing=SPACING), key=lambda c: c.case_id)
    return cases, [np.asarray(Image.open(c.image).convert("L")) for c in cases]


def val_mre(card: dict, nets: dict, cases: list, grays: list, cfg) -> float:
    det = Detector(card, TorchBackend(nets, cfg.device, cfg.threads, channels_last=False))
    a = np.diag([SPACING, SPACING, 0.0])
    images = [Radiograph(g, a, True, str(c.image)) for c, g in zip(cases, grays)]
    pred = np.stack([lm.xy for lm in det.detect_batch(images)])
    return float(radial_errors(pred, np.stack([c.xy for c in cases]), SPACING).mean())


def train(pack: Path, out: Path, recipe_name: str, minutes: float, device: str, workers: int,
          limit: int | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-train-"))
    cases, grays = load_pack(pack, work / "data")
    train_i = [i for i, c in enumerate(cases) if c.case_id not in VAL_IDS][:limit]
    val_cases = [c for c in cases if c.case_id in VAL_IDS]
    val_grays = [g for c, g in zip(cases, grays) if c.case_id in VAL_IDS]
    cfg = recipe(recipe_name, device=device, workers=workers, threads=4, checkpoint_every_s=120.0)
    spec = net_specs(cfg)["coarse"]
    card = {"name": f"ceph-isbi2015-{recipe_name}-gpu", "coarse": spec,
            "landmarks": [{"name": n, "description": d} for n, d in CEPH_19]}
    size = tuple(spec["input"]["size"][::-1])

    def make() -> tuple[LandmarkNet, CoarseSet]:
        return (LandmarkNet({**spec["net"], "num_keypoints": len(CEPH_19)}),
                CoarseSet([cases[i] for i in train_i], [grays[i] for i in train_i], spec["input"], True, cfg))

    t = time.time()
    run_stage("probe", *make(), size, cfg, 1, cfg.batch_size, work, dict, lambda r: None)
    epochs = max(1, int((minutes * 60 - 60) / max(time.time() - t, 1e-3)) - 1)  # a minute for the rest

    def write(record: dict) -> None:
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)

    write({"recipe": recipe_name, "device": device, "epochs": epochs, "train": len(train_i), "val": len(val_cases)})
    net, data = make()
    calls = []

    def validate() -> dict:
        calls.append(1)
        if len(calls) % max(1, epochs // 10) and len(calls) != epochs:
            return {}
        return {"val_coarse_mre_mm": val_mre(card, {"coarse": net}, val_cases, val_grays, cfg)}

    run_stage("coarse", net, data, size, cfg, epochs, cfg.batch_size, work, validate, write)
    save_parts({"coarse": net.cpu()}, card, out)


def save_parts(nets: dict, card: dict, out: Path) -> None:
    """The nets as float16 safetensors in parts under PART_BYTES, and the card beside them."""
    from safetensors.torch import save_file

    tensors = {f"{s}.{k}": v.detach().half().contiguous() for s, n in nets.items() for k, v in n.state_dict().items()}
    parts, size = [{}], 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if size + nbytes > PART_BYTES and parts[-1]:
            parts.append({})
            size = 0
        parts[-1][key] = t
        size += nbytes
    for i, part in enumerate(parts):
        save_file(part, str(out / f"nets-{i}.safetensors"))
    (out / "card.json").write_text(json.dumps({**card, "parts": len(parts)}, indent=1))


def export(trained: Path, out: Path, isbi: Path, patch_from: str = "ceph-isbi2015") -> Path:
    """The GPU run's whole-image net + ``patch_from``'s patch stage -> an ONNX model folder
    (float16), calibrated on full-resolution 141-150."""
    from safetensors.torch import load_file

    from MedSapiensLandmarksLib.checkpoints import save_model
    from MedSapiensLandmarksLib.evaluation import card_entries

    card = json.loads((trained / "card.json").read_text())
    state: dict = {}
    for i in range(card.pop("parts")):
        state.update(load_file(str(trained / f"nets-{i}.safetensors")))
    coarse = LandmarkNet({**card["coarse"]["net"], "num_keypoints": len(card["landmarks"])})
    coarse.load_state_dict({k.split(".", 1)[1]: v.float() for k, v in state.items()})
    patch = Detector.load(patch_from, backend="torch", device="cpu")
    card["refine"] = patch.card["refine"]
    nets = {"coarse": coarse.eval(), "refine": patch.nets["refine"]}
    everything = sorted(read_landmark_csv(isbi / "train_senior.csv", isbi / "images", spacing=0.1),
                        key=lambda c: c.case_id)
    val = [c for c in everything if c.case_id in VAL_IDS]
    train_xy = np.stack([c.xy for c in everything if c.case_id not in VAL_IDS])
    card.update(card_entries(Detector(card, TorchBackend(nets, "cpu")), train_xy, val))
    return save_model(out, card, nets)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--export", action="store_true", help="TRAINED OUT ISBI: make the ONNX model folder")
    ap.add_argument("--recipe", default="v2-640")
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--limit", type=int, default=None, help="first N training images only (a smoke test)")
    ap.add_argument("--patch-from", default="ceph-isbi2015", help="--export: the model whose patch stage is kept")
    a = ap.parse_args()
    if a.export:
        print(export(*map(Path, a.paths), patch_from=a.patch_from))
    else:
        train(Path(a.paths[0]), Path(a.paths[1]), a.recipe, a.minutes, a.device, a.workers, a.limit)
