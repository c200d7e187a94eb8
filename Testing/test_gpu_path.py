"""Issue 27's GPU path, run on the CPU: the data pack that travels, the training half without
SimpleITK (the device machine has none), and the export half back here."""
import csv
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from MedSapiensLandmarksLib.detector import Detector
from MedSapiensLandmarksLib.imageio import read_image

ROOT = Path(__file__).resolve().parents[1]
NO_SITK = "import sys, runpy; sys.modules['SimpleITK'] = None; sys.argv = sys.argv[1:]; " \
          "runpy.run_path(sys.argv[0], run_name='__main__')"


def test_the_pack_trains_on_a_machine_without_simpleitk_and_exports_here(ceph_dir, tmp_path):
    pack = tmp_path / "pack.zip"
    subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_pack.py"), str(ceph_dir.parent), str(pack)], check=True)
    assert pack.stat().st_size < 8e6  # beside the 59 MB tree, under the device tool's 64 MiB
    with zipfile.ZipFile(pack) as zf:
        names = zf.namelist()
        rows = list(csv.reader(zf.read("isbi/train_senior.csv").decode().splitlines()))
    assert sorted(n for n in names if n.endswith(".jpg")) == [f"isbi/images/{i:03d}.jpg" for i in range(1, 151)]
    with open(ceph_dir / "train_senior.csv", newline="") as f:
        original = {r[0]: r for r in csv.reader(f)}
    row = rows[1]
    assert np.allclose([float(v) for v in row[1:]], (np.array(original[row[0]][1:], float) + 0.5) / 3 - 0.5, atol=0.006)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", NO_SITK, str(ROOT / "bench" / "gpu_train.py"), str(pack), str(out),
                           "--recipe", "v2-640", "--minutes", "0.1", "--device", "cpu", "--workers", "0",
                           "--limit", "4"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["epochs"] == 1 and log[0]["train"] == 4 and log[0]["val"] == 10
    assert log[1]["stage"] == "coarse" and np.isfinite(log[1]["val_coarse_mre_mm"])
    assert all(p.stat().st_size < 15 * 2 ** 20 for p in out.glob("nets-*.safetensors"))  # each file comes back
    model = tmp_path / "model"
    subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_train.py"), "--export", str(out), str(model),
                    str(ceph_dir)], check=True, capture_output=True)
    det = Detector.load(model)
    assert det.card["coarse"]["input"]["size"] == [640, 512] and det.local_stages == ["refine"]
    assert det.card["calibration"]["cases"] == [str(i) for i in range(141, 151)]
    lm = det.detect(read_image(ceph_dir / "images" / "151.jpg", spacing=0.1))
    assert lm.xy.shape == (19, 2) and np.isfinite(lm.xy).all()
