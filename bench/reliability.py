"""How often the plausibility verdict warns: a model over image sets, as they are or changed.

    python bench/reliability.py MODEL SET [SET ...]

SET = CSV[:split][:change] with change one of none, mirror, crop50 (top half), crop70,
noise (uniform 16-bit noise of the image's size); prints, per set, the share of images
with a warning and the shape-score range (docs/reliability.md).
"""
from __future__ import annotations

import dataclasses
import sys

import numpy as np

from MedSapiensLandmarksLib.datasets import read_landmark_csv
from MedSapiensLandmarksLib.detector import Detector
from MedSapiensLandmarksLib.imageio import Radiograph


def change(image: Radiograph, how: str, rng: np.random.Generator) -> Radiograph:
    px = image.pixels
    if how == "mirror":
        px = px[:, ::-1]
    elif how.startswith("crop"):
        px = px[: int(px.shape[0] * int(how[4:]) / 100)]
    elif how == "noise":
        px = rng.integers(0, 65536, px.shape[:2]).astype(np.uint16)
    return dataclasses.replace(image, pixels=np.ascontiguousarray(px))


def main(model: str, sets: list[str]) -> None:
    from MedSapiensLandmarksLib.imageio import read_image

    det = Detector.load(model)
    rng = np.random.default_rng(0)
    print(f"model {det.card.get('name', model)}")
    for spec in sets:
        path, split, how = (spec.split(":") + ["", ""])[:3]
        cases = [c for c in read_landmark_csv(path) if not split or c.split == split]
        verdicts = [det.detect(change(read_image(c.image, spacing=0.1), how or "none", rng)).meta["plausibility"]
                    for c in cases]
        warned = [not v["plausible"] for v in verdicts]
        scores = [v["shape_score"] for v in verdicts]
        print(f"{spec}: {len(cases)} images, warning on {sum(warned)} ({100 * np.mean(warned):.1f} %), "
              f"shape score {min(scores):.0f}-{max(scores):.0f} (median {np.median(scores):.0f})", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
