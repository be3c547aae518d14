"""`grata serve`: the inbox loop (`grata.runtime.inbox`) over an adaptive model
(`grata.runtime.adaptive`), with signals, start-up and summary lines."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path

from grata.cli.common import (
    add_alias,
    add_hyperparameters,
    add_paper,
    add_quiet,
    add_seed,
    add_threads,
    product_choice,
)
from grata.cli.report import add_html_args
from grata.cli.roi_args import add_roi_args, roi_options
from grata.cli.scale_args import add_scale_args, check_scale_args
from grata.errors import GrataError
from grata.norm import NormSpec
from grata.product import PRODUCT_NORM, SERVE_METHOD
from grata.report_html import write_serve_html
from grata.runtime.adaptive import AdaptiveModel
from grata.runtime.guards import DEFAULT_MAX_DRIFT
from grata.runtime.inbox import DEFAULT_STABLE_S, check_folders, lock_inbox, log_stderr, serve
from grata.runtime.predictors import ORT_DEVICES, PREDICTORS, SERVE_PRECISIONS
from grata.runtime.record import theta_digest
from grata.specs import parse_spec, spec_hyperparameters

EPILOG = """\
files: for each image NAME that lands in INBOX (names starting with '.' or ending in
.tmp/.part are left alone until renamed): OUTBOX/NAME.<hash>.mask.png (255 background,
128 disc rim, 0 cup, at the image's size), .overlay.png, and .json (disc/cup areas,
vCDR, timings of adapt and predict, theta version, drift, resets), written atomically;
then NAME moves to INBOX/processed/ (or INBOX/rejected/ with NAME.reason.txt, once
unchanged for --stable-for seconds). In OUTBOX and rejected/, NAME is made safe and
bounded (other characters than letters, digits and ._+- as _, at most 96 characters,
then ~ and a hash of the name); the record keeps the original name. One server per
inbox and per state.
The adapted state lives in STATE (default OUTBOX/.state); a restart resumes from it;
STATE/config.json records the run's configuration (method, hyperparameters, artifacts).
"""


def register(subparsers) -> dict:
    s = subparsers.add_parser(
        "serve", help="adapt and segment images as they arrive in a folder",
        description="Watch an inbox folder; adapt the model on each new image (one step "
        "of the method, in arrival order), segment it with the adapted model and write "
        "the results to the outbox. The adapted state is checkpointed atomically and "
        "resumed after a restart or a crash.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--inbox", required=True, type=Path, help="folder images arrive in")
    s.add_argument("--outbox", required=True, type=Path, help="folder results go to")
    s.add_argument("--artifacts", required=True, type=Path,
                   help="exported artifact folder (grata export)")
    s.add_argument("--method", default=SERVE_METHOD, metavar="METHOD[@RULE][+gate]",
                   help="bn, tent, grata, grata-noalign, grata-fixedlr or source, optionally "
                   "with its statistics (grata@mix:0.2) and the safety gate (+gate: falls "
                   "back to the source prediction when the adapted one looks worse; the "
                   f"decision is the record's 'gate'); default {SERVE_METHOD}")
    s.add_argument("--norm", default=None, metavar="RULE",
                   help="BN statistics when --method gives none: sample, source, mix:A, "
                   "mix:nN, ema:M[,A] (mix and ema serve on onnxruntime); default "
                   f"{PRODUCT_NORM} (sample with --paper)")
    add_paper(s)
    s.add_argument("--predictor", default="auto", choices=PREDICTORS,
                   help="who serves the prediction: tensorrt where installed, else "
                   "onnxruntime (default auto)")
    add_alias(s, "--backend", "predictor", choices=PREDICTORS)
    s.add_argument("--device", default="auto", choices=ORT_DEVICES,
                   help="where to adapt (and the onnxruntime predictor): cuda keeps theta on "
                   "the GPU with the fused update; auto: cuda where it can run, else cpu")
    s.add_argument("--precision", choices=SERVE_PRECISIONS,
                   help="what the predictor computes in: fp32 (no TF32), tf32 (asked by "
                   "name), fp16, int8 (TensorRT); default: TensorRT's fp16 where its "
                   "builder has FP16, else fp32; onnxruntime serves fp32")
    s.add_argument("--calibration", type=Path, help="folder of images for --precision int8")
    s.add_argument("--state", type=Path, help="state folder (default OUTBOX/.state)")
    s.add_argument("--checkpoint-every", type=int, default=1, metavar="N",
                   help="checkpoint the adapted state every N images (default 1)")
    s.add_argument("--max-drift", type=float, default=DEFAULT_MAX_DRIFT,
                   help="largest |theta - theta0| / |theta0| before a reset to the last "
                   f"good theta (default {DEFAULT_MAX_DRIFT}; 0 disables)")
    s.add_argument("--reset", action="store_true",
                   help="start from the source theta, discarding the saved state")
    add_hyperparameters(s)
    add_seed(s)
    add_threads(s)
    s.add_argument("--once", action="store_true",
                   help="process the images present (waiting for partial ones), then exit")
    s.add_argument("--poll", type=float, default=0.5, help="seconds between inbox scans")
    s.add_argument("--settle", type=float, default=1.0,
                   help="a file unchanged this long (or across two scans) is complete")
    s.add_argument("--stable-for", type=float, default=DEFAULT_STABLE_S, metavar="SECONDS",
                   help="a file that cannot be served is rejected only once its size and "
                   "time have been unchanged this long; until then it is tried again, so "
                   f"a stalled copy is served once it completes (default {DEFAULT_STABLE_S:g})")
    add_roi_args(s, whole=False, missed="rejected",
                 note=" (the record holds the box and the localisation score)")
    add_scale_args(s)
    add_html_args(s, "OUTBOX")
    add_quiet(s, "no line per image")
    return {"serve": cmd_serve}


def cmd_serve(args) -> int:
    for flag, value in (("--max-drift", args.max_drift), ("--stable-for", args.stable_for),
                        ("--poll", args.poll), ("--settle", args.settle)):
        if not value >= 0:
            raise GrataError(f"{flag} must be a number >= 0, not {value}")
    check_scale_args(args)
    check_folders(args.inbox, args.outbox)  # before loading anything
    norm, base = product_choice(args)
    args.norm = NormSpec(norm)
    spec = parse_spec(args.method, args.norm)  # a bad spec: before any lock
    hp = spec_hyperparameters([spec], args.hp, args.config, args.norm, base=base)
    inbox_lock = lock_inbox(args.inbox)  # one server per inbox, refused before any work
    try:
        return _serve(args, hp[spec.key])
    finally:
        os.close(inbox_lock)


def _serve(args, hp: dict) -> int:
    state = args.state or args.outbox / ".state"
    log = None if args.quiet else log_stderr
    model = AdaptiveModel(args.artifacts, state, method=args.method, predictor=args.predictor,
                          device=args.device, precision=args.precision, threads=args.threads,
                          checkpoint_every=args.checkpoint_every,
                          max_drift=args.max_drift if args.max_drift > 0 else None,
                          seed=args.seed, reset=args.reset, calibration=args.calibration,
                          hyperparameters=hp, norm=args.norm, roi=roi_options(args),
                          scale=args.scale, disc_scale=args.disc_scale)
    stop = threading.Event()
    previous = {}
    try:
        fallback = getattr(model.predictor, "fallback", None)
        log_stderr(f"grata serve: {model.describe()}"
                   + (f" (tensorrt not used: {fallback})" if fallback else ""))
        if model.scale_line:
            log_stderr(f"grata serve: {model.scale_line}")
        r = model.resumed
        log_stderr(f"grata serve: resumed {state}: {r['n_images']} images adapted, theta "
                   f"v{r['theta_version']} {r['theta_sha256']}" if r else
                   f"grata serve: starting from the source theta "
                   f"{theta_digest(model.theta)} (state {state})")
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, lambda *_: stop.set())
            except ValueError:  # not the main thread
                pass
        after = _html_writer(args.outbox, args.vcdr_threshold) if args.html else None
        counts = serve(args.inbox, args.outbox, model, once=args.once, poll_s=args.poll,
                       settle_s=args.settle, stable_s=args.stable_for, stop=stop, log=log,
                       after_image=after, locked=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        model.close()
    log_stderr(f"grata serve: {counts['served']} served, {counts['recovered']} recovered, "
               f"{counts['already_served']} already served, {counts['rejected']} rejected, "
               f"{counts['left']} left for a later run, "
               f"{counts['resets']} resets; {model.n_images} images adapted, theta "
               f"v{model.theta_version} {theta_digest(model.theta)}, drift "
               f"{model.drift:.4f}")
    return 0


def _html_writer(outbox: Path, vcdr_threshold: float):
    """Rewrites OUTBOX/report.html after each image; a failure is a warning, never a stop."""
    def write() -> None:
        try:
            write_serve_html(outbox, vcdr_threshold=vcdr_threshold)
        except (GrataError, OSError) as exc:
            log_stderr(f"grata serve: warning: report.html not rewritten: {exc}")
    return write
