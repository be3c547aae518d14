"""GPU check of the runtime: GraTa on the CPU engine, the CUDA engine and torch on CUDA.

One command on a machine with a CUDA GPU (a few minutes):

    python benchmarks/gpu_runtime_check.py --out runtime_check.json

Two models are exported at --size (default 256): the small edge ResUnet and ResUnet-34,
random weights with spread-out BN affines and statistics (no checkpoint needed). The same
--images synthetic fundus images (default 8) then stream through GraTa (seed 0) on

* ``cpu``: `OrtEngine` on onnxruntime's CPU provider, numpy update (the reference);
* ``cuda-onnx``: `CudaEngine`: onnxruntime's CUDA provider through IOBinding, theta,
  moments and gradients on the GPU, the fused update kernel, one stream;
* ``cuda-torch``: `TorchEngine` on CUDA: the fused kernel on torch's flat BN buffer.

Per image: wall time from the host image to the host prediction (perf_counter; reading the
prediction waits for the device), and for the GPU engines the device time of the same span
(CUDA events). Medians leave out the first image (cuDNN plans, kernel load). Agreement:
relative L2 distance of the final theta to the CPU engine's, and the share of prediction
pixels (logit > 0) that agree with it.

Needs torch with CUDA, onnx (export), onnxruntime-gpu, CuPy for the driver's
CUDA major version (cupy-cuda12x / cupy-cuda13x), and the ``gpu`` extra (cuda-python,
cuda-core, NVRTC) for the kernel. Exit status: 0 every engine ran and agreed with the CPU
within --tol, 1 one did not, 2 no GPU (or a missing package), with the reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODELS = ("edge", "resnet34")
ENGINES = ("cpu", "cuda-onnx", "cuda-torch")


def log(*a):
    print(*a, flush=True)


def require_gpu() -> str | None:
    """None when everything this check needs is here, else why not (one line)."""
    try:
        import torch
    except ImportError:
        return "no CUDA device: torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device: torch.cuda.is_available() is False"
    from grata.runtime.cuda_engine import cuda_unavailable

    return cuda_unavailable(0)


def make_model(arch: str, seed: int):
    import torch

    from grata.models import ResUnet

    torch.manual_seed(seed)
    model = ResUnet(arch)
    with torch.no_grad():  # statistics and affines away from their initial values
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.6, 1.4)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def make_images(n: int, size: int, seed: int) -> list[np.ndarray]:
    from grata.synth import TARGET_DOMAINS, render

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = render(rng, TARGET_DOMAINS[i % len(TARGET_DOMAINS)], size)[0]
        img = img.astype(np.float32).transpose(2, 0, 1)
        out.append((img - img.min()) / max(float(img.max() - img.min()), 1e-6))
    return out


class _Timer:
    """Device time of a span on the engine's stream (None for the CPU engine)."""

    def __init__(self, engine):
        self.engine = engine
        self.kind = ("cupy" if getattr(engine, "stream", None) is not None
                     else "torch" if engine.kind == "torch" else None)

    def event(self):
        if self.kind == "cupy":
            import cupy

            ev = cupy.cuda.Event()
            ev.record(self.engine.stream)
            return ev
        if self.kind == "torch":
            import torch

            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return None

    def elapsed_ms(self, a, b) -> float | None:
        if self.kind == "cupy":
            import cupy

            return float(cupy.cuda.get_elapsed_time(a, b))
        if self.kind == "torch":
            return float(a.elapsed_time(b))
        return None


def run_engine(engine, images, seed: int) -> dict:
    from grata.methods import create

    method = create("grata", engine, seed=seed)
    timer = _Timer(engine)
    wall, device, preds = [], [], []
    for img in images:
        t0 = time.perf_counter()
        a = timer.event()
        x = engine.to_input(img)
        logits = method.adapt(x, image=img)
        b = timer.event()
        pred = engine.to_numpy(logits)  # waits for the device
        wall.append(time.perf_counter() - t0)
        device.append(timer.elapsed_ms(a, b) if a is not None else None)
        preds.append(np.asarray(pred, np.float32))
    theta = np.asarray(engine.to_numpy(engine.theta), np.float64)
    theta0 = np.asarray(engine.to_numpy(engine.theta0), np.float64)
    steady = wall[1:] or wall
    row = {"wall_ms": [round(1e3 * w, 3) for w in wall],
           "median_ms": round(1e3 * statistics.median(steady), 3),
           "first_ms": round(1e3 * wall[0], 3),
           "events": method.events, "theta": theta, "theta0": theta0, "preds": preds}
    if device[0] is not None:
        row["device_ms"] = [round(d, 3) for d in device]
        row["device_median_ms"] = round(statistics.median(device[1:] or device), 3)
    return row


def check_model(arch: str, size: int, images, seed: int, threads: int | None,
                workdir: Path) -> dict:
    import torch

    from grata.export import export_artifacts
    from grata.engine_chooser import open_engine
    from grata.models import save_checkpoint

    ckpt, art = workdir / f"{arch}.pt", workdir / f"{arch}-{size}"
    save_checkpoint(make_model(arch, seed), ckpt)
    t0 = time.perf_counter()
    manifest = export_artifacts(ckpt, arch, size, art)
    out = {"arch": arch, "size": size, "n_theta": manifest["n_theta"],
           "export_s": round(time.perf_counter() - t0, 1), "engines": {}}
    log(f"\n== {arch} at {size}x{size}: theta {manifest['n_theta']} values, exported in "
        f"{out['export_s']} s")
    makers = {
        "cpu": lambda: open_engine(art, "cpu", threads),
        "cuda-onnx": lambda: open_engine(art, "cuda", threads),
        "cuda-torch": lambda: open_engine(device="cuda", kind="torch", checkpoint=ckpt,
                                          arch=arch),
    }
    for name, make in makers.items():
        try:
            engine = make()
            out["engines"][name] = run_engine(engine, images, seed)
            del engine
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001  (report, go on with the others)
            out["engines"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            log(f"  {name}: failed: {out['engines'][name]['error']}")
    ref = out["engines"].get("cpu", {})
    for name, row in out["engines"].items():
        if "theta" not in row:
            continue
        if "theta" in ref:
            moved = float(np.linalg.norm(ref["theta"] - ref["theta0"]))
            row["theta_moved"] = moved
            row["theta_rel_to_cpu"] = float(np.linalg.norm(row["theta"] - ref["theta"])
                                            / np.linalg.norm(ref["theta"]))
            row["pixels_agree"] = float(np.mean([np.mean((p > 0) == (q > 0))
                                                 for p, q in zip(row["preds"], ref["preds"])]))
        del row["theta"], row["theta0"], row["preds"]
    return out


def print_table(results: list[dict]) -> None:
    log(f"\n{'model':<10} {'engine':<11} {'median ms':>10} {'first ms':>9} {'device ms':>10} "
        f"{'theta rel':>10} {'pixels':>8} {'speed-up':>8}")
    for res in results:
        cpu = res["engines"].get("cpu", {}).get("median_ms")
        for name, row in res["engines"].items():
            if "error" in row:
                log(f"{res['arch']:<10} {name:<11} error: {row['error'][:60]}")
                continue
            dev = row.get("device_median_ms")
            speed = f"{cpu / row['median_ms']:.1f}x" if cpu else "-"
            log(f"{res['arch']:<10} {name:<11} {row['median_ms']:>10.2f} {row['first_ms']:>9.1f} "
                f"{'-' if dev is None else f'{dev:.2f}':>10} "
                f"{row.get('theta_rel_to_cpu', float('nan')):>10.2e} "
                f"{row.get('pixels_agree', float('nan')):>8.4f} {speed:>8}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the results as JSON to this path")
    ap.add_argument("--size", type=int, default=256, help="image size (default 256)")
    ap.add_argument("--images", type=int, default=8, help="images per engine (default 8)")
    ap.add_argument("--models", default=",".join(MODELS), help="edge,resnet34 (default both)")
    ap.add_argument("--threads", type=int, help="CPU threads of the CPU engine (default: cores)")
    ap.add_argument("--tol", type=float, default=1e-4,
                    help="largest relative theta distance to the CPU engine (default 1e-4)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    why = require_gpu()
    if why is not None:
        print(f"gpu_runtime_check: {why}", file=sys.stderr)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"error": why}, f, indent=1)
        return 2

    import torch

    t0 = time.perf_counter()
    props = torch.cuda.get_device_properties(0)
    import onnxruntime

    result = {"device": props.name, "torch": torch.__version__,
              "onnxruntime": onnxruntime.__version__, "size": args.size,
              "images": args.images, "models": []}
    log(f"device {props.name}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}"
        f"; {args.images} images of GraTa at {args.size}x{args.size}")
    images = make_images(args.images, args.size, args.seed)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for arch in [a.strip() for a in args.models.split(",") if a.strip()]:
            res = check_model(arch, args.size, images, args.seed, args.threads, Path(tmp))
            result["models"].append(res)
            for name in ENGINES:
                row = res["engines"].get(name, {})
                ok &= "error" not in row and not row.get("events")
                if name != "cpu":
                    ok &= row.get("theta_rel_to_cpu", float("inf")) <= args.tol
    print_table(result["models"])
    result["agree_within_tol"] = ok
    result["seconds"] = round(time.perf_counter() - t0, 1)
    log(f"\nall engines ran and agree with the CPU within {args.tol:g}: {ok} "
        f"({result['seconds']} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
        log(f"results written to {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
