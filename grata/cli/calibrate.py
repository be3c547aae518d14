"""`grata calibrate`: INT8 (and FP16) artifacts and a Dice report against float32."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from grata import __version__, defaults
from grata.adapt import check_names
from grata.artifacts import cached_artifacts
from grata.calibration.evaluate import evaluate, format_comparison, model_sizes
from grata.calibration.quantize import CALIBRATORS, convert_fp16, quantize_artifacts
from grata.cli.common import add_quiet, add_seed, add_threads, csv_list
from grata.domains import resolve_targets
from grata.errors import GrataError
from grata.report import write_json_atomic
from grata.synth import SOURCE_DOMAIN

EPILOG = """\
examples:
  grata calibrate --out runs/int8
      the embedded default: the shipped edge model's artifacts, calibrated on the
      synthetic source domain's training images, scored on the synthetic targets
  grata calibrate --artifacts art/r34_512 --images /data/REFUGE/train/image \\
      --method entropy --data /data/fundus --source REFUGE --out runs/r34_int8

outputs: OUT/int8/ (an artifact folder: infer is the QDQ INT8 graph, the gradient graphs
stay float32; use it with grata adapt --artifacts or grata bench --int8), OUT/fp16/
with --fp16, OUT/report.json (Dice of float32 vs INT8 per target domain and method,
model sizes, settings).
"""


def register(sub) -> dict:
    c = sub.add_parser(
        "calibrate", help="quantise the infer graph to INT8 (QDQ) and score it against FP32",
        description="Post-training quantisation of the infer graph from unlabeled source-"
        "domain images (onnxruntime's static quantiser, QDQ format, standard ONNX ops only, "
        "so onnxruntime's CPU provider runs it and TensorRT builds INT8 engines from it), "
        "optionally FP16 copies of all graphs for GPUs, then Dice of float32 against the "
        "reduced precision on a labeled set, without (bn) and with (grata) adaptation.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--artifacts", type=Path, help="float32 artifact folder (default: the "
                   "shipped edge model, exported into the cache on first use)")
    c.add_argument("--images", type=Path, help="folder of unlabeled source-domain images "
                   "(recursive; default: the synthetic source domain's training images)")
    c.add_argument("--method", default="percentile", choices=CALIBRATORS,
                   help="calibrator of the activation ranges (default percentile; on the "
                   "synthetic benchmark entropy clipped the cup's activations: -1.4 Dice "
                   "points, see BENCHMARKS.md)")
    c.add_argument("--percentile", type=float, default=99.999,
                   help="for --method percentile: the percentile of |x| kept (99.999)")
    c.add_argument("--bins", type=int, default=2048,
                   help="histogram bins of the entropy / percentile calibrators (2048)")
    c.add_argument("--per-tensor", action="store_true",
                   help="one weight scale per tensor instead of per output channel")
    c.add_argument("--max-images", type=int, default=64,
                   help="calibration images used, evenly spread over the folder (64; 0 = all)")
    c.add_argument("--fp16", action="store_true", help="also write and score FP16 artifacts")
    c.add_argument("--data", type=Path, help="labeled data root for the Dice report "
                   "(default: the synthetic benchmark)")
    c.add_argument("--source", help="the source domain, left out of the default targets")
    c.add_argument("--targets", type=csv_list, help="comma-separated target domains "
                   "(default: every domain but the source)")
    c.add_argument("--methods", type=csv_list, default=["bn", "grata"],
                   help="methods scored (default bn,grata: without and with adaptation)")
    c.add_argument("--no-eval", action="store_true", help="write the artifacts only")
    add_seed(c)
    add_threads(c)
    add_quiet(c)
    c.add_argument("--out", required=True, type=Path, help="output folder")
    return {"calibrate": cmd_calibrate}


def cmd_calibrate(args) -> int:
    if args.max_images < 0:
        raise GrataError("--max-images must be 0 (all) or more")
    if not args.no_eval:
        check_names(args.methods, "domain")
    artifacts = args.artifacts or cached_artifacts(
        defaults.checkpoint(), defaults.DEFAULT_ARCH, defaults.DEFAULT_SIZE, args.quiet)
    synthetic = None
    if args.images is None or (args.data is None and not args.no_eval):
        synthetic = defaults.synthetic_root(progress=not args.quiet)
    images = args.images
    if images is None:
        images = synthetic / SOURCE_DOMAIN / "train" / "image"
    out = args.out
    start = time.perf_counter()
    manifest = quantize_artifacts(artifacts, images, out / "int8", method=args.method,
                                  per_channel=not args.per_tensor,
                                  max_images=args.max_images or None,
                                  percentile=args.percentile, bins=args.bins)
    q = manifest["quantization"]
    print(f"wrote {out / 'int8'}: infer INT8 (QDQ, {args.method} calibration on "
          f"{q['calibration_images']} images, weights {q['weights']})")
    variants = {"fp32": Path(artifacts), "int8": out / "int8"}
    if args.fp16:
        convert_fp16(artifacts, out / "fp16")
        variants["fp16"] = out / "fp16"
        print(f"wrote {out / 'fp16'}: every graph FP16 inside, FP32 inputs and outputs")
    sizes = model_sizes(variants)
    report = {"format_version": 1, "kind": "calibration", "grata_version": __version__,
              "artifacts": str(artifacts), "images": str(images), "quantization": q,
              "model_size": sizes, "evaluation": None}
    if not args.no_eval:
        root = args.data or synthetic
        source = args.source
        if source is None and args.data is None:
            source = SOURCE_DOMAIN
        targets = resolve_targets(root, source, args.targets)
        comparison = evaluate(variants, root, targets, args.methods, seed=args.seed,
                              threads=args.threads, progress=not args.quiet)
        report["evaluation"] = {"data": str(root), "source": source, "targets": targets,
                                "methods": args.methods, "seed": args.seed, **comparison}
        print(f"\nDice (%) per target domain, {' vs '.join(variants)} "
              f"(d = difference of the mean from fp32):")
        print(format_comparison(comparison))
    report["elapsed_s"] = time.perf_counter() - start
    write_json_atomic(out / "report.json", report)
    for name, s in sizes.items():
        print(f"infer graph {name}: {s['infer_bytes'] / 1e6:.2f} MB "
              f"({sizes['fp32']['infer_bytes'] / s['infer_bytes']:.1f}x smaller than fp32)"
              if name != "fp32" else f"infer graph fp32: {s['infer_bytes'] / 1e6:.2f} MB")
    print(f"report: {out / 'report.json'}")
    return 0
