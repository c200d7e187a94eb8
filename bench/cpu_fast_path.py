"""Measure CPU fast-path options for the default model's nets: channels-last memory format and
bfloat16 autocast, against the plain float32 forward (median of N runs, same inputs), with the
largest heatmap difference so an option is only kept if it is faster at equal output.

    .venv/bin/python bench/cpu_fast_path.py [--repeat 10]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MedSapiensLandmarks"))
from MedSapiensLandmarksLib.checkpoints import load_model  # noqa: E402


def median_ms(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    det = load_model("default", device="cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'stage':<8}{'variant':<16}{'ms':>8}{'max |diff|':>12}")
    for stage, net in det.nets.items():
        spec = det.card[stage]["input"]
        batch = 1 if stage == "coarse" else len(det.names)
        x = torch.randn(batch, spec.get("channels", 1), *spec["size"])
        with torch.inference_mode():
            ref = net(x)
            variants = {
                "float32": lambda: net(x),
                "channels_last": lambda: net(x.contiguous(memory_format=torch.channels_last)),
                "bf16 autocast": lambda: _bf16(net, x),
            }
            for name, fn in variants.items():
                if name == "channels_last":
                    net.to(memory_format=torch.channels_last)
                ms = median_ms(fn, args.repeat)
                diff = (fn().float() - ref).abs().max().item()
                net.to(memory_format=torch.contiguous_format)
                print(f"{stage:<8}{name:<16}{ms:8.1f}{diff:12.2e}")


def _bf16(net, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return net(x)


if __name__ == "__main__":
    main()
