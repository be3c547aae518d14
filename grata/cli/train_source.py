"""`grata train-source`: train a source model on one domain."""

from __future__ import annotations

from pathlib import Path

from grata import defaults
from grata.cli.common import data_root
from grata.disc_scale import sidecar_path
from grata.errors import GrataError
from grata.sizes import check_size
from grata.synth import SOURCE_DOMAIN


def register(subparsers) -> dict:
    t = subparsers.add_parser(
        "train-source", help="train a source model on one domain",
        description="Train a ResUnet on the train split of one domain (SGD Nesterov, "
        "momentum 0.99, poly decay, Dice + BCE). Interrupted runs resume from OUT.state.pt. "
        "The training discs' scale (vertical diameter over the crop's side, its spread, "
        "the centres' offsets) is written beside the checkpoint as OUT.scale.json; "
        "'grata export' puts it into the manifest.")
    t.add_argument("--data", type=Path, help="data root (default: the synthetic benchmark)")
    t.add_argument("--domain", help="source domain (default: the synthetic source)")
    t.add_argument("--arch", default=defaults.DEFAULT_ARCH,
                   help="resnet18, resnet34 or edge (default edge)")
    t.add_argument("--size", type=int, default=defaults.DEFAULT_SIZE,
                   help="input size S, a multiple of 32, at least 64 (default 128)")
    t.add_argument("--epochs", type=int, default=60, help="epochs (default 60)")
    t.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    t.add_argument("--lr", type=float, default=1e-3, help="initial learning rate (1e-3)")
    t.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    t.add_argument("--threads", type=int, help="CPU threads (default: all cores; 1 gives "
                   "results that do not depend on the machine's core count)")
    t.add_argument("--no-resume", action="store_true", help="start over even if a state exists")
    t.add_argument("--scale-only", action="store_true",
                   help="do not train: measure the train split's disc scale at --size and "
                   "write OUT.scale.json beside an existing checkpoint OUT (one trained on "
                   "that split, e.g. before the scale was measured)")
    t.add_argument("--out", required=True, type=Path, help="checkpoint to write (.pt)")
    return {"train-source": cmd_train}


def cmd_train(args) -> int:
    from grata.train import train_source  # torch: the device runtime has none
    root = data_root(args.data, True)
    domain = args.domain or (SOURCE_DOMAIN if args.data is None else None)
    if domain is None:
        raise GrataError("--domain is required with --data")
    check_size(args.size)
    if args.scale_only:
        from grata.train import measure_source_scale
        if not args.out.is_file():
            raise GrataError(f"{args.out}: checkpoint not found (--scale-only writes the "
                             f"scale beside an existing checkpoint)")
        scale = measure_source_scale(root, domain, args.size, args.out)
        print(f"wrote {sidecar_path(args.out)}: {scale.describe()}")
        return 0
    info = train_source(root, domain, args.arch, args.size, args.epochs, args.out,
                        batch=args.batch, lr=args.lr, seed=args.seed,
                        resume=not args.no_resume, threads=args.threads)
    print(f"wrote {info['checkpoint']} ({info['n_images']} images, {info['epochs']} epochs, "
          f"final loss {info['final_loss']:.4f})\nsha256 {info['sha256']}\n"
          f"{info['disc_scale'].describe()}")
    return 0
