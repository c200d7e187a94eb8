"""Command line: ``medsapiens-landmarks detect | evaluate | train | bench | serve``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import CheckpointError
from .imageio import ImageError
from .inputs import case_stem, expand_inputs
from .loading import BACKENDS

TRAIN_EXTRA = {"torch", "torchvision", "timm", "safetensors", "onnx", "matplotlib"}
FORMATS = ("mrk.json", "fcsv", "csv", "png", "analysis", "measurements", "report")


class UsageError(ValueError):
    """Bad command-line input (exit code 2)."""


def load_detector(args: argparse.Namespace):
    """The model of ``--model`` with the official-checkpoint and flip options of the command."""
    from .detector import Detector

    official = {k: v for k, v in (("anatomy", args.anatomy), ("pretrain", args.pretrain)) if v}
    det = Detector.load(args.model, device=args.device, threads=args.threads, backend=args.backend,
                        **official)
    if args.flip or args.no_flip:
        det.card["coarse"]["input"]["flip_test"] = not args.no_flip
    return det


def parse_formats(text: str) -> list[str]:
    fmts = [f.strip().lstrip(".") for f in text.split(",") if f.strip()]
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        shown = ", ".join(bad) if bad else repr(text)
        raise UsageError(f"unknown output format(s) {shown}; choose from {', '.join(FORMATS)}")
    return fmts


def shard(files: list[Path], spec: str | None) -> list[Path]:
    """This machine's share of a sorted file list: ``K/N`` or ``env`` (RANK / WORLD_SIZE, as
    set by torchrun, or SLURM_PROCID / SLURM_NTASKS)."""
    import os

    if not spec:
        return files
    if spec == "env":
        env = os.environ
        k, n = (env.get("RANK", env.get("SLURM_PROCID")), env.get("WORLD_SIZE", env.get("SLURM_NTASKS")))
        if k is None or n is None:
            raise UsageError("--shard env: RANK/WORLD_SIZE (or SLURM_PROCID/SLURM_NTASKS) are not set")
        spec = f"{k}/{n}"
    try:
        k, n = (int(v) for v in spec.split("/"))
    except ValueError:
        raise UsageError(f"--shard {spec!r}: expected K/N, e.g. 0/4") from None
    if not 0 <= k < n:
        raise UsageError(f"--shard {spec}: K must be in 0..N-1")
    return sorted(files)[k::n]


def prepare_output(out: Path) -> None:
    """Create the output folder, or say in one line why it cannot be used."""
    import tempfile

    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: output path exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as err:
        raise UsageError(f"{out}: output folder cannot be written ({err.strerror or err})") from None


def cmd_detect(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .analysis import CEPH_NAMES
    from .batch import detect_files, pending

    fmts = parse_formats(args.format)
    files = shard(expand_inputs(args.inputs), args.shard)
    if not files:
        raise UsageError("no input images (folders are searched for image files by extension)")
    out = Path(args.output)
    prepare_output(out)
    first: dict[str, Path] = {}
    clashes = []
    for f in files:  # two inputs of one name (a.png, a.tif): the second would overwrite the first
        owner = first.setdefault(case_stem(f), f)
        if owner != f:
            clashes.append(f)
            print(f"error: {f}: same output name as {owner}; skipped (rename it)", file=sys.stderr)
    files = list(first.values())
    todo = pending(files, case_stem, out, fmts) if args.skip_existing else files
    if len(todo) < len(files) and not args.quiet:
        print(f"skipping {len(files) - len(todo)} image(s) whose outputs exist", file=sys.stderr)
    if not todo:
        return 2 if clashes else 0
    det = load_detector(args)
    ceph_only = [f for f in ("analysis", "measurements") if f in fmts]
    if ceph_only and tuple(det.names) != CEPH_NAMES:
        raise UsageError(f"the {' and '.join(ceph_only)} output needs a model of the 19 ISBI "
                         f"cephalometric landmarks")
    if "report" in fmts:
        try:
            import matplotlib  # noqa: F401
        except ModuleNotFoundError:
            raise UsageError("the report output needs matplotlib: pip install "
                             "'medsapiens-landmarks[report]'") from None
    workers = args.workers if args.workers is not None else (1 if len(todo) > 1 else 0)
    bar = tqdm(total=len(todo), unit="image", disable=len(todo) < 2 or args.quiet, file=sys.stderr)

    def say(message: str, problem: bool) -> None:
        if problem or not args.quiet:
            bar.write(message, file=sys.stderr if problem else sys.stdout)

    failures = detect_files(det, todo, out, fmts, case_stem, workers, say, bar.update,
                            spacing=args.spacing, slice_index=args.slice, axis=args.axis)
    bar.close()
    return 2 if failures + len(clashes) else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .datasets import read_landmark_csv
    from .evaluation import evaluate

    cases = read_landmark_csv(args.csv, args.images, spacing=args.spacing)
    if args.split:
        cases = [c for c in cases if c.split == args.split]
    if not cases:
        raise UsageError(f"{args.csv}: no cases" + (f" in split {args.split!r}" if args.split else ""))
    truth = np.stack([c.xy for c in cases])
    if args.second_csv:
        other = {c.case_id: c.xy for c in read_landmark_csv(args.second_csv, args.images)}
        truth = np.stack([(c.xy + other[c.case_id]) / 2 for c in cases])
    if args.limit:
        cases, truth = cases[: args.limit], truth[: args.limit]
    det = load_detector(args)
    if truth.shape[1] != len(det.names):
        raise UsageError(f"{args.csv} has {truth.shape[1]} landmarks, the model {len(det.names)}")
    ev = evaluate(det, cases, truth, hand=args.hand)
    print(f"{len(cases)} images, {len(det.names)} landmarks, model {det.card.get('name', args.model)}, "
          f"{ev.seconds_per_image:.2f} s/image")
    print(f"{'landmark':<10}{'MRE mm':>8}{'SD':>7}" + "".join(f"{'<' + format(r, 'g') + 'mm':>8}" for r in ev.radii))
    for name, s in [*ev.per_landmark.items(), ("ALL", ev.overall)]:
        print(f"{name:<10}{s['mre_mm']:>8.3f}{s['sd_mm']:>7.2f}"
              + "".join(f"{s[f'sdr_{r:g}mm']:>8.1f}" for r in ev.radii))
    rk = ev.ranking
    print(f"confidence: Spearman(conf, error) {rk['spearman']:.3f}; MRE of the 10% least confident "
          f"{rk['mre_least_confident_mm']:.3f} mm vs {rk['mre_rest_mm']:.3f} mm for the rest")
    cal = ev.calibration
    print(f"calibration: ECE(within 2 mm) {cal['ece_2mm']:.3f}; red flag (confidence < 0.5) on "
          f"{cal['flagged_pct']:.1f}% of points, catching {cal['caught_pct']:.1f}% of the "
          f"{cal['errors_over_radius']} errors > 2 mm")
    if ev.classes:
        print("classification agreement (%): " + ", ".join(
            f"{k} {v['accuracy_pct']:.1f}" for k, v in ev.classes.items() if isinstance(v, dict))
            + f"; average {ev.classes['average_accuracy_pct']:.1f}")
    if ev.analyses:
        print("analyses, class agreement % (90 % interval coverage %): " + ", ".join(
            f"{name} {v['agreement_pct']:.1f}"
            + (f" ({v['interval_coverage_pct']:.1f})" if v["interval_coverage_pct"] is not None else "")
            for name, v in ev.analyses["per_analysis"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"csv": str(args.csv), **ev.to_json()}, indent=1))
    if args.report:
        from .report import write_report

        print(f"report: {write_report(ev, args.report, str(args.csv))}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Fit the model card's confidence calibration (with ``--train-csv`` also its shape model
    and verdict limits) on annotated validation cases."""
    from .cards import read_card, resolve
    from .datasets import read_landmark_csv
    from .evaluation import card_entries
    from .markups import write_text
    from .shape import MIN_SHAPES

    card_path = resolve(args.model)
    if card_path.suffix == ".pth":
        raise UsageError("calibrate writes into a model card: give a model folder or model.json")
    cases = read_landmark_csv(args.csv, args.images, spacing=args.spacing)
    cases = [c for c in cases if (not args.split or c.split == args.split)
             and (not args.ids or c.case_id in args.ids.split(","))]
    if not cases:
        raise UsageError(f"{args.csv}: no cases selected")
    card = read_card(card_path)
    train_xy = None
    if args.train_csv:
        listed = set(card.get("training", {}).get("train_cases", []))
        train = [c for c in read_landmark_csv(args.train_csv, args.images)
                 if (c.case_id in listed if listed else not args.train_split or c.split == args.train_split)]
        if len(train) < MIN_SHAPES:
            raise UsageError(f"{args.train_csv}: {len(train)} training cases of this model found; "
                             f"the shape model needs at least {MIN_SHAPES}")
        train_xy = np.stack([c.xy for c in train])
    card.update(card_entries(load_detector(args), train_xy, cases, hand=args.hand))
    write_text(card_path, json.dumps(card, indent=2) + "\n")
    print(f"{card_path}: calibration {json.dumps(card['calibration'])}")
    if train_xy is not None:
        print(f"{card_path}: shape model of {len(train_xy)} training shapes, verdict limits "
              f"{json.dumps(card['shape']['thresholds'])}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .datasets import read_landmark_csv
    from .detector import Detector
    from .landmarks import CEPH_19, HAND_37, numbered
    from .markups import write_text
    from .training import RECIPES, TrainConfig, check_finetune, fit, point_errors, recipe

    cases, names = read_training_cases(args)
    if not args.cases:
        if args.ids:
            text = Path(args.ids[1:]).read_text() if args.ids.startswith("@") else args.ids
            wanted = [i.strip() for i in text.replace("\n", ",").split(",") if i.strip()]
            by_id = {c.case_id: c for c in cases}
            missing = [i for i in wanted if i not in by_id]
            if missing:
                raise UsageError(f"--ids: no case {', '.join(missing[:5])} in {args.csv}")
            cases = [by_id[i] for i in wanted]
        k = len(cases[0].xy) if cases else 0
        names = {19: CEPH_19, 37: HAND_37}.get(k, numbered("P", "point", k))
    cases.sort(key=lambda c: str(c.image))
    if args.val_csv or args.val_split:
        val = read_landmark_csv(args.val_csv or args.csv, args.images, spacing=args.spacing)
        val = [c for c in val if not args.val_split or c.split == args.val_split]
        if not val:
            raise UsageError(f"no validation cases in split {args.val_split!r}")
    else:
        n_val = args.val_count if args.val_count is not None else (10 if args.csv else max(1, len(cases) // 5))
        n_val = min(n_val, max(0, len(cases) - 1))
        cases, val = cases[: len(cases) - n_val], cases[len(cases) - n_val:]
    if not cases:
        raise UsageError("no training cases")
    if args.recipe not in RECIPES:
        raise UsageError(f"--recipe: unknown {args.recipe!r}; known: {', '.join(RECIPES)}")
    cfg = recipe(args.recipe, coarse_epochs=args.coarse_epochs, refine_epochs=args.refine_epochs,
                 context_epochs=args.context_epochs, seed=args.seed, threads=args.threads or 2,
                 device=args.device, workers=args.workers, train_check=args.train_check,
                 lr=args.lr if args.lr is not None else TrainConfig.lr)
    init = Detector.load(args.init, device="cpu", backend="torch") if args.init else None
    same = init is not None and len(init.names) == len(names)
    if init is not None and not same:
        print(f"--init model has {len(init.names)} landmarks, the cases {len(names)}: "
              f"transferring all but the output layers", flush=True)
    before = point_errors(init, val) if same and val else None
    anatomy = {19: "a lateral cephalogram", 37: "a hand radiograph"}.get(len(names))
    card = {"name": args.name or Path(args.output).name, **({"anatomy": anatomy} if anatomy else {}),
            "dataset": {"source": str(args.csv or args.cases), "train": len(cases), "val": len(val)}}
    if args.reframe and init is None:
        raise UsageError("--reframe needs --init (the model whose stages are reframed)")
    path = fit(cases, val, names, Path(args.output), cfg, card=card, init=init, reframe=args.reframe)
    print(f"model written: {path}")
    adapted = {}
    if same and init.card.get("site_layer"):  # from an adapted model: the new one ends adapted too
        from .site_model import refit_own_layer

        layer = refit_own_layer(path, cases, init.card["site_layer"])
        adapted = {"site_layer_cases": len(layer.cases)}
    if before is not None:
        after = point_errors(Detector.load(path, device="cpu", backend="torch"), val)
        report = {"val_cases": len(val), **check_finetune(before, after), **adapted}
    elif init is not None:  # why the new model could not be compared with the old one
        reason = (f"the cases have {len(names)} landmarks and the model {len(init.names)}: "
                  f"the two cannot be compared" if not same else
                  f"{len(cases)} case(s) are too few to hold one back for a check (export at least 2)")
        report = {"val_cases": len(val), "validated": False, "reason": reason, **adapted}
    if init is not None:
        write_text(Path(args.output) / "finetune.json", json.dumps(report, indent=2) + "\n")
        print("finetune: " + json.dumps(report))
    return 0


def read_training_cases(args: argparse.Namespace) -> tuple[list, list[tuple[str, str]] | None]:
    """Cases of ``--csv`` (with ``--images``, ``--spacing``, ``--split``) or of ``--cases``."""
    from .datasets import read_landmark_csv
    from .export import read_cases

    if bool(args.csv) == bool(args.cases):
        raise UsageError("give exactly one of --csv (ISBI-style CSV) or --cases (export folder)")
    if args.cases:
        return read_cases(args.cases)
    cases = read_landmark_csv(args.csv, args.images, spacing=args.spacing)
    return [c for c in cases if not args.split or c.split == args.split], None


def cmd_adapt(args: argparse.Namespace) -> int:
    from .site_model import base_model, fit_site, write_site_model

    cases, _ = read_training_cases(args)
    base = base_model(args.model)  # refitting an adapted model starts from its base again
    det = load_detector(argparse.Namespace(**{**vars(args), "model": base}))
    try:
        adapted, warnings = fit_site(det, cases, args.frame, args.shrink)
    except ValueError as err:
        raise UsageError(str(err)) from None
    for line in warnings:
        print(line, file=sys.stderr)
    path = write_site_model(base, adapted, args.output)
    layer = adapted.layer
    size = np.linalg.norm(layer.offsets, axis=1)
    top = ", ".join(f"{det.names[i]} {size[i]:.3g}" for i in np.argsort(-size)[:3])
    unit = "|S-N|" if layer.frame == "sn" else "mm"
    withheld = (" (withheld: the corrections do not repeat from case to case; each case adapted to the "
                "others lands farther from its corrected points than the model's own)" if layer.withheld else "")
    print(f"adapted {base} to {len(layer.cases)} cases of this site (frame {layer.frame}, shrink "
          f"{layer.shrink:g}); largest offsets ({unit}): {top}{withheld}; confidence: "
          f"{adapted.confidence_note()}; model written: {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_batch, bench_image, sapiens_random

    results = {}
    runs = [(args.model, lambda: None, args.repeat)]  # Sapiens built only after: RSS stays per model
    if args.sapiens:
        runs.append((args.sapiens, lambda: sapiens_random(f"sapiens_{args.sapiens}"), args.sapiens_repeat))
    for label, build, repeat in runs:
        res = bench_image(args.image, args.model, args.spacing, repeat, args.threads, det=build(),
                          backend=args.backend)
        results[label] = res
        print(f"model {res['model']}, {res['backend']} backend, {res['threads']} threads, "
              f"median of {res['repeat']} runs")
        for stage, seconds in res["stages_s"].items():
            print(f"  {stage:<20}{seconds * 1000:9.1f} ms")
        print(f"  {'raw forward (floor)':<20}{res['raw_forward_s'] * 1000:9.1f} ms")
        print(f"  overhead end-to-end / floor: {res['overhead']:.2f}x; peak RSS {res['peak_rss_mb']:.0f} MB")
    if args.folder:
        for workers in (0, 1):
            res = bench_batch(args.folder, args.model, args.count, args.spacing, workers, threads=args.threads,
                              backend=args.backend)
            results[f"batch_workers_{workers}"] = res
            print(f"batch over {res['images']} images of {args.folder} ({workers} reader worker(s), "
                  f"mrk.json): {res['images_per_s']:.2f} images/s, peak RSS {res['peak_rss_mb']:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.append:
        from .bench import markdown

        with open(args.append, "a") as f:
            f.write("\n" + markdown(results, "medsapiens-landmarks bench " + " ".join(sys.argv[2:])))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import aiohttp  # noqa: F401  (the gateway's proxy)
        import trame_slicer  # noqa: F401
    except ImportError as err:
        raise UsageError(f"the web front end needs trame-slicer ({err}); "
                         "pip install 'medsapiens-landmarks[web]'") from None
    from .gateway import LOOPBACK, serve

    if args.host not in LOOPBACK and not args.allow_remote:
        raise UsageError(f"--host {args.host} exposes patient images to the network; "
                         "add --allow-remote if that is intended (an access token is then required)")
    if args.max_sessions < 1:
        raise UsageError("--max-sessions must be at least 1")
    serve(args.host, args.port, args.export_dir, args.model, token=args.token,
          max_sessions=args.max_sessions, idle_s=args.session_timeout, anatomy=args.anatomy,
          upstream_timeout_s=args.upstream_timeout)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .adaptation import DEFAULT_SHRINK, FRAMES

    p = argparse.ArgumentParser(prog="medsapiens-landmarks",
                                description="Anatomical landmark detection on radiographs.")
    sub = p.add_subparsers(dest="command", required=True)

    def model_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", default="default",
                        help="'default', a shipped model name, a model folder/card, or a MedSapiens .pth")
        sp.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
        sp.add_argument("--threads", type=int, default=None, help="CPU threads")
        sp.add_argument("--flip", action="store_true", help="test-time horizontal flip averaging")
        sp.add_argument("--anatomy", default=None,
                        help="official multi-dataset checkpoint: head, chest, hand or leg")
        sp.add_argument("--pretrain", default=None,
                        help="official LoRA checkpoint: the Sapiens pretrain file (sapiens_<size>_*.pth)")
        sp.add_argument("--no-flip", action="store_true",
                        help="official checkpoints: skip the flip test (half the time)")
        sp.add_argument("--backend", choices=BACKENDS, default=None,
                        help="onnx (default for shipped models on CPU) or torch (GPU, official .pth)")

    d = sub.add_parser("detect", help="detect landmarks on images or folders of images")
    d.add_argument("inputs", nargs="+", help="image files or folders")
    d.add_argument("-o", "--output", required=True, help="output folder")
    d.add_argument("--format", default="mrk.json,png", help=f"comma list of {', '.join(FORMATS)}")
    d.add_argument("--spacing", type=float, default=None, help="mm per pixel (overrides the file)")
    d.add_argument("--slice", type=int, default=None, help="slice index of a 3D volume")
    d.add_argument("--axis", type=int, default=2, help="slice axis of a 3D volume (0=i, 1=j, 2=k)")
    d.add_argument("--skip-existing", action="store_true",
                   help="skip images whose outputs all exist (resume an interrupted batch)")
    d.add_argument("--workers", type=int, default=None,
                   help="image-reading worker processes (default: 1 for several images, else 0)")
    d.add_argument("--shard", default=None, metavar="K/N|env",
                   help="process only share K of N of the sorted inputs (env: torchrun/Slurm rank)")
    d.add_argument("-q", "--quiet", action="store_true")
    model_opts(d)
    d.set_defaults(func=cmd_detect)

    e = sub.add_parser("evaluate", help="MRE/SDR against an ISBI-style CSV of landmarks")
    e.add_argument("csv")
    e.add_argument("--images", default=None, help="image folder (default: <csv folder>/images)")
    e.add_argument("--second-csv", default=None, help="second annotator; truth = mean of both")
    e.add_argument("--spacing", type=float, default=0.1, help="mm per pixel (ISBI: 0.1)")
    e.add_argument("--hand", action="store_true", help="hand protocol: 50 mm wrist width, SDR 2/4/10")
    e.add_argument("--split", default=None, help="keep rows of this split (hand CSV: valid)")
    e.add_argument("--limit", type=int, default=0, help="first N images only")
    e.add_argument("--json", default=None, help="write all numbers to this JSON file")
    e.add_argument("--report", default=None, metavar="DIR",
                   help="write a markdown report with figures and the worst cases into DIR")
    model_opts(e)
    e.set_defaults(func=cmd_evaluate)

    t = sub.add_parser("train", help="train or fine-tune a model from annotated images")
    t.add_argument("--csv", default=None, help="ISBI-style landmark CSV")
    t.add_argument("--cases", default=None, help="export folder (dataset.json) from Slicer/export")
    t.add_argument("--images", default=None)
    t.add_argument("--split", default=None, help="keep rows of this split (hand CSV: train)")
    t.add_argument("--ids", default=None, help="only these case ids (comma list, or @file)")
    t.add_argument("--val-csv", default=None)
    t.add_argument("--val-split", default=None,
                   help="validation (monitoring only) = rows of this split (hand CSV: valid)")
    t.add_argument("--val-count", type=int, default=None,
                   help="last N cases held out for validation (default: 10 of a CSV, 1/5 of cases)")
    t.add_argument("--spacing", type=float, default=None)
    t.add_argument("-o", "--output", required=True, help="model folder to write")
    t.add_argument("--name", default=None)
    t.add_argument("--init", default=None, help="model to fine-tune from")
    t.add_argument("--coarse-epochs", type=int, default=40)
    t.add_argument("--refine-epochs", type=int, default=25)
    t.add_argument("--context-epochs", type=int, default=0,
                   help="train a wide-patch stage between coarse and refine (0: none)")
    t.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 1e-3; lower it to continue training a model)")
    t.add_argument("--recipe", default="v1",
                   help="architecture + augmentation recipe (training.RECIPES: v1, v2, v3, v4, v5, v2-640, v2-800, "
                        "v5-640, v3-exposure)")
    t.add_argument("--reframe", nargs="+", default=[], choices=["coarse", "context", "refine"],
                   help="with --init: these stages keep their weights but take the recipe's input size "
                        "and patch extent")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the nets train (cuda: bfloat16 autocast); the model is exported on the CPU")
    t.add_argument("--workers", type=int, default=0, help="data-loader processes for the augmentation")
    t.add_argument("--train-check", type=int, default=0,
                   help="also log the MRE on N evenly spaced training images each epoch (train_mre_mm)")
    t.set_defaults(func=cmd_train)
    c = sub.add_parser("calibrate", help="fit a model's confidence calibration on validation cases")
    c.add_argument("csv", help="ISBI-style CSV of annotated validation cases (never the test sets)")
    c.add_argument("--images", default=None)
    c.add_argument("--spacing", type=float, default=0.1, help="mm per pixel (ISBI: 0.1)")
    c.add_argument("--split", default=None)
    c.add_argument("--ids", default=None, help="comma list of case ids")
    c.add_argument("--hand", action="store_true", help="hand cases: millimetres by the 50 mm wrist width")
    c.add_argument("--train-csv", default=None,
                   help="the model's training annotations: also fit the shape model (plausibility check); "
                        "rows are those the card lists as training cases")
    c.add_argument("--train-split", default=None, help="rows of this split when the card lists none")
    model_opts(c)
    c.set_defaults(func=cmd_calibrate)

    a = sub.add_parser("adapt", help="learn a site's convention from its corrected cases (no training)")
    a.add_argument("--csv", default=None, help="ISBI-style landmark CSV of the site's corrected cases")
    a.add_argument("--cases", default=None, help="export folder (dataset.json) from Slicer/export")
    a.add_argument("--images", default=None)
    a.add_argument("--split", default=None, help="keep rows of this split")
    a.add_argument("--spacing", type=float, default=None, help="mm per pixel of the CSV's images")
    a.add_argument("-o", "--output", required=True, help="adapted model folder to write (a card only)")
    a.add_argument("--frame", choices=FRAMES, default=None,
                   help="offset frame: sn (S-N, default when the model has S and N) or mm")
    a.add_argument("--shrink", type=float, default=DEFAULT_SHRINK,
                   help=f"pseudo-cases of no offset (default {DEFAULT_SHRINK:g}): few cases move points part way")
    model_opts(a)
    a.set_defaults(func=cmd_adapt)

    b = sub.add_parser("bench", help="time each stage of detection on one image")
    b.add_argument("image")
    b.add_argument("--model", default="default")
    b.add_argument("--spacing", type=float, default=0.1)
    b.add_argument("--repeat", type=int, default=5)
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--backend", choices=BACKENDS, default=None)
    b.add_argument("--folder", default=None, help="also time batch detection over this folder")
    b.add_argument("--count", type=int, default=20, help="images of --folder to use")
    b.add_argument("--sapiens", default=None, choices=["0.3b", "0.6b", "1b", "2b"],
                   help="also time a random-weight Sapiens of this size at 1024x768")
    b.add_argument("--sapiens-repeat", type=int, default=2)
    b.add_argument("--append", default=None, metavar="MD",
                   help="append the tables (with date, machine, torch, threads) to this markdown file")
    b.add_argument("--json", default=None)
    b.set_defaults(func=cmd_bench)
    q = sub.add_parser("quantize", help="store a model's weights as int8 (the shipped form; float32 compute)")
    q.add_argument("model", help="model folder or model.json with float16 graphs")
    q.add_argument("-o", "--output", required=True, help="model folder to write")
    q.set_defaults(func=cmd_quantize)
    r = sub.add_parser("release", help="publish: model zips + the model index; the extension's repository")
    r.add_argument("-o", "--output", required=True, help="folder for the zips and their index.json")
    r.add_argument("--models", default=None, help="comma list of model folders (default: all in the tree)")
    r.add_argument("--base-url", default=None, help="where the zips will be served (default: GitHub releases)")
    r.add_argument("--update-index", action="store_true",
                   help="also write the index into the tree (Resources/Models/index.json)")
    r.add_argument("--extension-repo", default=None, metavar="DIR",
                   help="also build the Extensions Index's repository here (one commit, embedded models only)")
    r.set_defaults(func=cmd_release)
    w = sub.add_parser("serve", help="browser front end (trame-slicer) on this machine")
    w.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    w.add_argument("--port", type=int, default=8080)
    w.add_argument("--export-dir", default="medsapiens-cases", help="where Export writes cases")
    w.add_argument("--model", default="default")
    w.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host")
    w.add_argument("--anatomy", default=None, help="official multi-dataset checkpoints: head|chest|hand|leg")
    w.add_argument("--token", default=None,
                   help="access token (default: generated and printed when not on loopback)")
    w.add_argument("--max-sessions", type=int, default=4, help="browsers served at once (one worker each)")
    w.add_argument("--session-timeout", type=float, default=120.0,
                   help="seconds after its page closes before a session ends and its uploads are deleted")
    w.add_argument("--upstream-timeout", type=float, default=120.0,
                   help="seconds to wait for a session worker's answer before telling the page it hangs")
    w.set_defaults(func=cmd_serve)
    return p


def cmd_quantize(args: argparse.Namespace) -> int:
    from .cards import read_card, resolve
    from .quantize import quantize_model

    card_path = resolve(args.model)
    if read_card(card_path).get("graph_storage"):
        raise UsageError(f"{card_path}: its weights are already int8")
    quantize_model(card_path, Path(args.output))
    print(f"model written: {Path(args.output) / 'model.json'}")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    """Zip the model folders, write their index; optionally build the extension repository."""
    import shutil

    from .catalog import INDEX_NAME, embedded_dir
    from .release import build_assets, build_extension_repo, release_folders

    folders = release_folders(args.models.split(",") if args.models else None)
    index = build_assets(folders, Path(args.output), args.base_url)
    for entry in json.loads(index.read_text())["models"].values():
        print(f"{entry['url']}  {entry['size'] / 1e6:.1f} MB  sha256 {entry['sha256']}")
    print(f"index: {index}")
    if args.update_index:
        shutil.copyfile(index, embedded_dir() / INDEX_NAME)
        print(f"index: {embedded_dir() / INDEX_NAME}")
    if args.extension_repo:
        root = Path(__file__).resolve().parents[2]
        print(f"extension repository: {build_extension_repo(root, Path(args.extension_repo))}")
    return 0


def fetch_named_model(model: str) -> None:
    """Download a model of the index before a command runs it, with a progress bar (once;
    later runs find it in the cache)."""
    from tqdm import tqdm

    from .cards import resolve

    bar: list[tqdm] = []

    def progress(done: int, total: int) -> None:
        if not bar:
            bar.append(tqdm(total=total or None, unit="B", unit_scale=True, desc=f"downloading {model}",
                            file=sys.stderr))
        bar[0].update(done - bar[0].n)

    try:
        resolve(model, progress=progress)
    finally:
        for b in bar:
            b.close()


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # file names with undecodable bytes still print
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "model", None):
            fetch_named_model(args.model)
        return args.func(args)
    except (UsageError, ImageError, CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:  # the light install: no torch / timm / matplotlib
        if err.name not in TRAIN_EXTRA:
            raise
        print(f"error: {args.command} needs {err.name}, which the light install leaves out: "
              f"pip install 'medsapiens-landmarks[train]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
