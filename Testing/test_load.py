"""Load: batch detect over 100 images (default run) and 1,000 (ISBI images repeated, a bad
file every 50th).

The 1,000-image run is slow (about 10 minutes on 2 cores):
``.venv/bin/python -m pytest -m slow Testing/test_load.py -s``. Memory must stay flat: the peak
RSS of the largest run within 15 % of the run before (100 vs 10 images, 1,000 vs 100).
"""
import json
import subprocess
import sys

import pytest

from conftest import ROOT

RUN = r"""
import json, resource, sys
from MedSapiensLandmarksLib.cli import main
rc = main(sys.argv[2:])
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
open(sys.argv[1], "w").write(json.dumps({"rc": rc, "rss_mb": own, "worker_rss_mb": kids}))
"""


def make_batch(folder, images, n, bad_every=50):
    folder.mkdir()
    for i in range(n):
        target = folder / f"{i:04d}.jpg"
        if (i + 1) % bad_every == 0:
            target.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        else:
            target.symlink_to(images[i % len(images)])
    return folder


def run_detect(tmp_path, folder, tag):
    stats = tmp_path / f"{tag}.json"
    proc = subprocess.run([sys.executable, "-c", RUN, str(stats), "detect", str(folder), "-o",
                           str(tmp_path / f"out-{tag}"), "--format", "mrk.json", "--spacing", "0.1", "-q"],
                          capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT / "MedSapiensLandmarks"), "PATH": "/usr/bin:/bin"})
    return json.loads(stats.read_text()), proc.stderr


def check_flat_memory(tmp_path, ceph_dir, sizes):
    """detect over each number of images (a bad file every 50th): errors reported, the rest
    written, and the peak RSS of the largest run within 15 % of the one before."""
    images = sorted((ceph_dir / "images").glob("*.jpg"))
    peaks = {}
    for n in sizes:
        folder = make_batch(tmp_path / f"in{n}", images, n)
        stats, err = run_detect(tmp_path, folder, str(n))
        errors = [x for x in err.splitlines() if x.startswith("error:")]
        assert stats["rc"] == (2 if n >= 50 else 0) and len(errors) == n // 50, errors[:3]
        assert all("truncated JPEG" in e for e in errors)
        written = list((tmp_path / f"out-{n}").glob("*.mrk.json"))
        assert len(written) == n - n // 50
        peaks[n] = stats["rss_mb"]
        print(f"{n} images: peak RSS {stats['rss_mb']:.0f} MB (reader worker {stats['worker_rss_mb']:.0f} MB)")
    assert peaks[sizes[-1]] <= 1.15 * peaks[sizes[-2]], peaks


def test_hundred_images_flat_memory_and_bad_files_skipped(tmp_path, ceph_dir):
    check_flat_memory(tmp_path, ceph_dir, (10, 100))


@pytest.mark.slow
def test_thousand_images_flat_memory_and_bad_files_skipped(tmp_path, ceph_dir):
    check_flat_memory(tmp_path, ceph_dir, (10, 100, 1000))
