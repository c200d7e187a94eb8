"""Issue 26: static int8 (QDQ, activations too) of a model's whole-image graph, for comparison
with the weight-only int8 form that ships. Calibrated on training images only.

    python bench/int8_static.py ceph-isbi2015 runs/s8/q/static-ceph --calib 40 --method percentile

writes a model folder (static-int8 coarse graph, weight-only int8 patch graph) to evaluate with
`medsapiens-landmarks evaluate`, and prints the forward time of each form.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MedSapiensLandmarks"))
from MedSapiensLandmarksLib.cards import resolve  # noqa: E402
from MedSapiensLandmarksLib.datasets import read_landmark_csv  # noqa: E402
from MedSapiensLandmarksLib.detector import Detector  # noqa: E402
from MedSapiensLandmarksLib.imageio import read_image  # noqa: E402
from MedSapiensLandmarksLib.onnx_io import FP32, read_graph_weights  # noqa: E402

CEPH = ROOT.parent / "shared" / "data" / "isbi2015-ceph"
METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
           "entropy": CalibrationMethod.Entropy}


def float32_graph(src: Path, dst: Path) -> None:
    """The graph with its stored weights (float16 or int8) as float32 initializers, no casts."""
    model = onnx.load(str(src))
    weights = read_graph_weights(src)
    casts = [n for n in model.graph.node if n.output[0].endswith(FP32)]
    names = {n.output[0]: n.input[0] for n in casts}
    keep = [n for n in model.graph.node if n not in casts]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    stored = set(names.values()) | {n + "::scale" for n in names.values()}
    inits = [i for i in model.graph.initializer if i.name not in stored]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    model.graph.initializer.extend(numpy_helper.from_array(weights[w], out) for out, w in names.items())
    onnx.save(model, str(dst))


class Inputs(CalibrationDataReader):
    def __init__(self, xs: list[np.ndarray]) -> None:
        self.it = iter({"input": x} for x in xs)

    def get_next(self):
        return next(self.it, None)


def forward_ms(path: Path, x: np.ndarray, repeat: int = 5) -> float:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    sess.run(None, {"input": x})
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        sess.run(None, {"input": x})
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--calib", type=int, default=40, help="training images 001.. used to calibrate")
    p.add_argument("--method", choices=METHODS, default="percentile")
    p.add_argument("--keep-float", choices=["none", "ends"], default="ends",
                   help="ends: the first convolution and the heatmap head stay float")
    args = p.parse_args()
    card_path = resolve(args.model)
    card = json.loads(card_path.read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    det = Detector.load(args.model)
    cases = sorted(read_landmark_csv(CEPH / "train_senior.csv", CEPH / "images", spacing=0.1),
                   key=lambda c: c.case_id)[: args.calib]
    xs = [det._coarse_input([read_image(c.image, spacing=0.1)])[2].astype(np.float32) for c in cases]
    f32 = out / "coarse-fp32.onnx"
    float32_graph(card_path.parent / card["graphs"]["coarse"], f32)
    convs = [n.name for n in onnx.load(str(f32)).graph.node if n.op_type == "Conv"]
    exclude = [convs[0], convs[-1]] if args.keep_float == "ends" else []
    quantize_static(str(f32), str(out / "coarse.onnx"), Inputs(xs), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=METHODS[args.method], nodes_to_exclude=exclude,
                    extra_options={"CalibPercentile": 99.999} if args.method == "percentile" else {})
    shutil.copyfile(card_path.parent / card["graphs"]["refine"], out / "refine.onnx")
    card["graphs"] = {"coarse": "coarse.onnx", "refine": "refine.onnx"}
    (out / "model.json").write_text(json.dumps(card))
    x = xs[0]
    print(json.dumps({"calib": args.calib, "method": args.method, "keep_float": args.keep_float,
                      "size_mb": round((out / "coarse.onnx").stat().st_size / 1e6, 2),
                      "forward_ms_fp32": round(forward_ms(f32, x), 1),
                      "forward_ms_static_int8": round(forward_ms(out / "coarse.onnx", x), 1)}))
    f32.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
