"""`grata adapt`: stream target domains through the methods and score every image."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from grata import adapt, domains
from grata.artifacts import cached_artifacts
from grata.cli.common import (
    add_alias,
    add_hyperparameters,
    add_model_args,
    add_paper,
    add_quiet,
    add_seed,
    add_threads,
    csv_list,
    data_root,
    model_choice,
    product_choice,
)
from grata.cli.report import add_html_args
from grata.cli.roi_args import ROI_HELP, add_roi_args, roi_choice, roi_config, save_overlay
from grata.cli.scale_args import (
    add_scale_args,
    check_scale_args,
    scale_choice,
    scale_config,
)
from grata.engine_chooser import engine_factory
from grata.errors import GrataError
from grata.gate import GateConfig
from grata.norm import NormSpec
from grata.outdir import check_out_dir
from grata.product import PRODUCT_METHODS, PRODUCT_NORM
from grata.report import build_report, format_table, plot_stream, write_json_atomic
from grata.report_html import write_adapt_html
from grata.run_config import run_config
from grata.specs import folder_name, spec_hyperparameters, split_specs
from grata.synth import SOURCE_DOMAIN

EPILOG = """\
examples:
  grata adapt --out runs/demo
      the embedded default: a synthetic multi-centre benchmark (made on first use),
      the shipped edge model, methods source,bn,tent,grata under the product's
      measured defaults (disc scale auto, statistics mix:0.3, step 1e-5: see
      README, "Defaults");
      a few minutes on 2 cores
  grata adapt --out runs/paper --paper
      the paper's setting: each image's own BN statistics, GraTa beta / TENT lr 1e-4
  grata adapt --data /data/fundus --source REFUGE --targets ORIGA,Drishti_GS \\
      --checkpoint refuge_resnet34.pt --arch resnet34 --size 512 --out runs/refuge
      real data in the GraTa CSV layout (or the DoFE folder layout)
  grata adapt --out runs/b1e3 --hp grata.beta=1e-3 --hp tent.lr=2e-4
      other hyperparameters (recorded in the report's config block)
  grata adapt --out runs/norm --norm mix:0.2 \\
      --methods source,bn,grata,grata@sample,tent@ema:0.1,bn@sample+gate
      statistics per method (METHOD@RULE; a plain name takes --norm); +gate: the safety
      gate falls back to the source prediction when the adapted one looks worse
      (--hp grata.beta=... applies to every grata spec, --hp grata@sample.beta=... to one)

outputs: DIR/report.json (per method and target: Dice OD/OC/mean, vCDR error,
surface distance, skipped files with reasons, per-image rows; "config": everything
needed to run it again); --overlays writes DIR/overlays/<method>/<target>/*.png
(':' in a method spec becomes '_' there),
--plot writes DIR/dice_stream.png.

""" + ROI_HELP


def register(subparsers) -> dict:
    a = subparsers.add_parser(
        "adapt", help="adapt on target domains and score every image",
        description="Stream each target domain image by image through each\n"
        "method (batch 1, one step per image, prediction after the step) and\n"
        "report Dice of optic disc (OD) and cup (OC) per domain.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--data", type=Path, help="data root (default: the synthetic benchmark, "
                   "generated on first use)")
    a.add_argument("--source", help="the source domain (excluded from the default targets)")
    a.add_argument("--targets", type=csv_list, help="comma-separated target domains "
                   "(default: every domain but the source)")
    add_model_args(a)
    a.add_argument("--methods", type=split_specs, default=list(PRODUCT_METHODS),
                   help="comma-separated METHOD[@RULE][+gate]: source, bn, tent, grata, "
                   "grata-noalign, grata-fixedlr, each optionally with its statistics "
                   "(grata@mix:0.2) and the safety gate (+gate); default "
                   f"{','.join(PRODUCT_METHODS)}")
    a.add_argument("--norm", default=None, metavar="RULE",
                   help="BN statistics of every method given without @RULE: sample (each "
                   "image's own, the paper), source (stored), mix:A or mix:nN (mixed), "
                   f"ema:M[,A] (following the stream); default {PRODUCT_NORM} (the "
                   "product's measured default; sample with --paper)")
    add_paper(a)
    a.add_argument("--protocol", default="domain", choices=["domain", "episodic", "continual"],
                   help="reset per target domain (default), per image, or never")
    a.add_argument("--engine", default="onnx", choices=["onnx", "torch"],
                   help="who answers the gradient questions: onnx, the exported graphs on "
                   "onnxruntime with numpy updates, no torch (default); torch, the PyTorch "
                   "reference")
    add_alias(a, "--backend", "engine", choices=["onnx", "torch"])
    a.add_argument("--artifacts", type=Path, help="exported artifact folder for --engine onnx "
                   "(default: export the checkpoint on first use into the cache)")
    a.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where to adapt (cuda: torch on the GPU with the fused kernel, or "
                   "onnxruntime's CUDA provider)")
    add_hyperparameters(a)
    add_seed(a)
    add_threads(a)
    a.add_argument("--overlays", action="store_true", help="write PNG overlays per image")
    a.add_argument("--plot", action="store_true", help="write a Dice-over-stream PNG")
    add_html_args(a, "OUT")
    add_roi_args(a)
    add_scale_args(a)
    add_quiet(a)
    a.add_argument("--out", required=True, type=Path, help="output folder")
    return {"adapt": cmd_adapt}


def cmd_adapt(args) -> int:
    check_out_dir(args.out)  # before any work: a finished domain must have somewhere to go
    norm, base = product_choice(args)
    args.norm = NormSpec(norm)  # a bad rule: one line, exit 2
    specs = adapt.check_names(args.methods, args.protocol, args.norm)
    hp = spec_hyperparameters(specs, args.hp, args.config, args.norm, base=base)
    gate = GateConfig() if any(s.gate for s in specs) else None
    checkpoint, arch, size = model_choice(args)
    whole, roi = roi_choice(args, not args.quiet)  # whole photographs: --roi auto / --whole
    check_scale_args(args)
    root = whole or data_root(args.data, not args.quiet)
    source = args.source
    if source is None and args.data is None:
        source = SOURCE_DOMAIN
    targets = domains.resolve_targets(root, source, args.targets)
    if args.threads and args.engine == "torch":
        import torch
        torch.set_num_threads(args.threads)

    if args.engine == "onnx":
        artifacts = args.artifacts or cached_artifacts(checkpoint, arch, size, args.quiet)
        factory = engine_factory("onnx", artifacts=artifacts, device=args.device,
                                 threads=args.threads)
        probe = factory()  # fail early on bad artifacts, before any work
        if probe.size != size:
            raise GrataError(f"artifacts {artifacts} were exported at size {probe.size}, "
                             f"not {size}; pass --size {probe.size} or export again")
        identity = {"artifacts": probe.manifest}
        scale = scale_choice(args, probe.manifest, checkpoint, args.quiet)
        checkpoint = artifacts
    else:
        if args.artifacts is not None:
            raise GrataError("--artifacts goes with --engine onnx")
        factory = engine_factory("torch", checkpoint=checkpoint, arch=arch, device=args.device)
        factory()  # fail early on a bad checkpoint, before any work
        identity = {"checkpoint_file": checkpoint}
        scale = scale_choice(args, None, checkpoint, args.quiet)
    config = run_config(seed=args.seed, size=size, engine=args.engine, device=args.device,
                        methods=hp, norm=args.norm, specs=specs, gate=gate, **identity,
                        protocol=args.protocol, data=str(root), source=source,
                        targets=targets, checkpoint=str(checkpoint), arch=arch,
                        **roi_config(roi), **scale_config(scale))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    def on_image(method, target, row, pred, sample):
        if args.overlays:
            stem = Path(sample.name).stem
            save_overlay(sample, pred, out / "overlays" / folder_name(method) / target
                         / f"{row['index']:04d}_{stem}.png")

    def on_domain(results):
        write_json_atomic(out / "report.json", build_report(results, config, complete=False))

    start = time.perf_counter()
    results = adapt.run(factory, root, targets, size, args.methods, args.protocol, args.seed,
                  on_image=on_image, on_domain=on_domain, progress=not args.quiet,
                  hyperparameters=hp, norm=args.norm, gate_config=gate, roi=roi,
                  scale=scale)
    report = build_report(results, config, complete=True)
    report["elapsed_s"] = time.perf_counter() - start
    write_json_atomic(out / "report.json", report)
    if args.plot:
        plot_stream(report, out / "dice_stream.png")
    page = _html(out) if args.html else None
    print(f"\nDice (%) on {len(targets)} target domain(s), protocol {args.protocol}, "
          f"engine {args.engine} on {args.device}:")
    print(format_table(report))
    print(f"\nreport: {out / 'report.json'}  ({report['elapsed_s']:.0f} s)"
          + (f"; {page}" if page else ""))
    return 0


def _html(out: Path) -> Path | None:
    """The HTML page of a finished run; a failure here never costs the run its report."""
    try:
        return write_adapt_html(out)
    except GrataError as exc:
        print(f"grata adapt: warning: no report.html: {exc}", file=sys.stderr)
        return None


__all__ = ["cmd_adapt", "register"]
