"""GPU check of the runtime's adaptation: GraTa and TENT image by image on the GPU with the
fused update, against the same stream on the CPU.

One command on a machine with a CUDA GPU, installing nothing (torch, cuda-python with
cuda-core, NVRTC and numpy are all it imports; grata comes from this checkout; no
onnxruntime-gpu, no TensorRT: those are `gpu_serve_check.py`'s):

    python benchmarks/gpu_runtime_check.py [--out runtime_check.json]

For each model (the edge ResUnet and ResUnet-34, random weights with spread-out BN
affines and statistics, at --size) and method, the same --images synthetic images stream
through `TorchEngine` on the CPU (numpy update: the reference) and on CUDA (theta a flat
view of the BN parameters on the GPU, the fused kernel updating it on a stream of the
check's own, TF32 off). One row per model and method in the one table it prints:

* ``moved``: |theta - theta0| / |theta0| on the GPU; it must be above 1e-6 (an update
  that did nothing would agree with anything);
* ``vs cpu``: |theta_gpu - theta_cpu| / |theta_cpu - theta0|, the GPU's distance from
  the CPU's result relative to how far adaptation moved (<= --tol, default 0.05);
* ``pixels``: share of prediction pixels whose sign agrees with the CPU's (>= 0.99);
* ``launches``: kernel launches of the last update, from the kernel (1 expected), on the
  stream the check ran on;
* ``tf32``: torch's TF32 switches stay off while the GPU engine runs;
* ``ms``: median wall time per image on the GPU (the first image left out).

Sizes are fixed, so it finishes in well under 5 minutes on one GPU. Exit status: 0 every
row passed (or no GPU: a skip, said so), 1 any mismatch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
from gpu_checkout import cuda_torch, skip, table, use_checkout

MODELS = ("edge", "resnet34")
METHODS = ("grata", "tent")


def log(*a):
    print(*a, flush=True)


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
    """Fundus-like [3,S,S] images in [0, 1]: a bright disc with a brighter cup on a
    reddish, vignetted background and noise (numpy only)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        cy, cx, r = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65), rng.uniform(0.08, 0.14)
        d = np.hypot(yy - cy, xx - cx)
        base = 0.55 - 0.35 * np.hypot(yy - 0.5, xx - 0.5)
        disc = np.clip(1.2 - d / r, 0, 1) * 0.35 + np.clip(1.2 - d / (0.5 * r), 0, 1) * 0.2
        img = np.stack([base + disc + 0.15, 0.6 * base + disc, 0.3 * base + 0.8 * disc])
        img += rng.normal(0, 0.03, img.shape)
        out.append(np.clip(img, 0, 1).astype(np.float32))
    return out


def run(engine, method_name: str, images, seed: int, stream=None) -> dict:
    """The method over the images on `engine` (inside `stream` when given)."""
    import contextlib

    import torch

    from grata.methods import create

    method = create(method_name, engine, seed=seed)
    walls, preds = [], []
    ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
    with ctx:
        for img in images:
            t0 = time.perf_counter()
            logits = method.adapt(engine.to_input(img), image=img)
            preds.append(np.asarray(engine.to_numpy(logits), np.float32))  # waits
            walls.append(time.perf_counter() - t0)
    return {"theta": np.asarray(engine.to_numpy(engine.theta), np.float64),
            "theta0": np.asarray(engine.to_numpy(engine.theta0), np.float64),
            "preds": preds, "events": list(method.events),
            "ms": 1e3 * statistics.median(walls[1:] or walls)}


def check(arch: str, size: int, images, seed: int, tol: float) -> list[dict]:
    import torch

    from grata.kernels import cuda_update
    from grata.engine_chooser import open_engine

    rows = []
    for name in METHODS:
        cpu = run(open_engine(kind="torch", model=make_model(arch, seed), device="cpu"), name, images, seed)
        stream = torch.cuda.Stream()  # not the default stream: the kernel must follow it
        gpu_engine = open_engine(kind="torch", model=make_model(arch, seed), device="cuda")
        gpu = run(gpu_engine, name, images, seed, stream)
        tf32_off = not (torch.backends.cuda.matmul.allow_tf32
                        or torch.backends.cudnn.allow_tf32)
        launch = dict(cuda_update.last_launch)
        moved = float(np.linalg.norm(gpu["theta"] - gpu["theta0"])
                      / np.linalg.norm(gpu["theta0"]))
        step = float(np.linalg.norm(cpu["theta"] - cpu["theta0"]))
        vs_cpu = float(np.linalg.norm(gpu["theta"] - cpu["theta"]) / max(step, 1e-30))
        pixels = float(np.mean([np.mean((p > 0) == (q > 0))
                                for p, q in zip(gpu["preds"], cpu["preds"])]))
        n_launch = len(launch.get("kernels", []))
        on_stream = launch.get("stream") == stream.cuda_stream
        ok = (moved > 1e-6 and step > 0 and vs_cpu <= tol and pixels >= 0.99
              and n_launch == 1 and on_stream and tf32_off
              and not gpu["events"] and not cpu["events"])
        rows.append({"model": arch, "method": name, "n_theta": int(gpu["theta"].size),
                     "moved": moved, "vs_cpu": vs_cpu, "pixels": pixels,
                     "launches": f"{n_launch}{'' if on_stream else ' (other stream)'}",
                     "tf32": "off" if tf32_off else "ON", "ms": round(gpu["ms"], 2),
                     "cpu_ms": round(cpu["ms"], 1), "events": gpu["events"], "ok": ok})
        cuda_update.release_stream(stream)
        del gpu_engine
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the rows as JSON to this path")
    ap.add_argument("--size", type=int, default=256, help="image size (default 256)")
    ap.add_argument("--images", type=int, default=6, help="images per run (default 6)")
    ap.add_argument("--tol", type=float, default=0.05,
                    help="largest GPU-to-CPU theta distance relative to the adaptation's "
                    "move (default 0.05)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch, why = cuda_torch()
    if torch is None:
        return skip("gpu_runtime_check", why)
    use_checkout()
    t0 = time.perf_counter()
    props = torch.cuda.get_device_properties(0)
    log(f"device {props.name}; torch {torch.__version__}; {args.images} images at "
        f"{args.size}x{args.size}")
    images = make_images(args.images, args.size, args.seed)
    rows = []
    for arch in MODELS:
        try:
            rows += check(arch, args.size, images, args.seed, args.tol)
        except Exception as e:  # noqa: BLE001  (a row that could not run is a failure)
            rows.append({"model": arch, "method": "-", "moved": f"error: {str(e)[:80]}",
                         "ok": False})
    log(table(rows, [("model", "model", 9), ("method", "method", 7), ("n_theta", "theta", 6),
                     ("moved", "moved", 9), ("vs_cpu", "vs cpu", 9), ("pixels", "pixels", 7),
                     ("launches", "launches", 9), ("tf32", "tf32", 5), ("ms", "ms", 8),
                     ("cpu_ms", "cpu ms", 8)]))
    failed = [r for r in rows if not r["ok"]]
    log(f"{len(rows) - len(failed)}/{len(rows)} rows passed in "
        f"{time.perf_counter() - t0:.0f} s" + (f"; FAILED: {len(failed)}" if failed else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": props.name, "rows": rows}, f, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
