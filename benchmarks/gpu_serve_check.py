"""GPU check of serving: `grata serve --device cuda` (the CUDA engine, onnxruntime-gpu,
CuPy) and the TensorRT predictor, against the CPU.

Run where onnxruntime-gpu and CuPy are installed (`pip install
'grata-edge[gpu,gpu-onnxruntime,export]'`, TensorRT rows with the ``gpu-tensorrt``
extra); elsewhere it says what is missing and exits 0 (a skip):

    python benchmarks/gpu_serve_check.py [--out serve_check.json]

An edge ResUnet with spread-out BN affines is exported at --size (torch and onnx for the
export), then one row each in the one table it prints:

* ``serve cuda``: `AdaptiveModel` on ``--device cuda`` against ``--device cpu`` over the
  same images (GraTa): theta moved, ended within --tol of the CPU's (relative to the
  move), the fused kernel ran, theta stayed a device array, predictions agree;
* ``sessions``: every session of the CUDA engine reports the engine's stream as its
  compute stream and ``use_tf32=0``;
* ``serve cuda ema``: the same under ``ema:0.1`` statistics (the mixed graphs);
* ``tensorrt fp32``: the TensorRT predictor on the engine's device theta against
  onnxruntime on the CPU (fp32, TF32 cleared);
* ``tensorrt fp16 step``: an fp16 engine (where this TensorRT builds fp16) must move its
  output for a 1e-5 step of gamma values exactly representable in float16.

Exit status: 0 every row ran and passed (or a skip, said so), 1 any mismatch.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from gpu_checkout import SKIP_EXIT, cuda_torch, table, use_checkout
from gpu_runtime_check import make_images, make_model


def log(*a):
    print(*a, flush=True)


def missing() -> list[str]:
    """What this check needs and this machine lacks."""
    gone = [name for name, mod in (("torch", "torch"), ("onnx", "onnx"), ("CuPy", "cupy"),
                                   ("onnxruntime", "onnxruntime"))
            if importlib.util.find_spec(mod) is None]
    if "onnxruntime" not in gone:
        import onnxruntime
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            gone.append("onnxruntime-gpu (the installed onnxruntime has no CUDA provider)")
    return gone


def serve_rows(art: Path, images, norm: str, tol: float) -> list[dict]:
    from grata.kernels import cuda_update
    from grata.runtime.adaptive import AdaptiveModel

    label = "serve cuda" + ("" if norm == "sample" else f" {norm.split(':')[0]}")
    ref = AdaptiveModel(art, method="grata", predictor="onnxruntime", device="cpu",
                        norm=norm)
    gpu = AdaptiveModel(art, method="grata", predictor="onnxruntime", device="cuda",
                        norm=norm)
    e = gpu.engine
    theta_obj = e.theta
    cuda_update.last_launch.clear()
    agree, ms = [], []
    for img in images:
        r = ref.process(img)
        t0 = time.perf_counter()
        q = gpu.process(img)
        ms.append(1e3 * (time.perf_counter() - t0))
        agree.append(float(np.mean((r["logits"] > 0) == (q["logits"] > 0))))
    theta0 = e.to_numpy(e.theta0).astype(np.float64)
    moved = float(np.linalg.norm(gpu.theta - theta0) / np.linalg.norm(theta0))
    step = float(np.linalg.norm(ref.theta - theta0))
    vs_cpu = float(np.linalg.norm(gpu.theta - ref.theta) / max(step, 1e-30))
    fused = bool(cuda_update.last_launch.get("kernels"))
    on_device = e.theta is theta_obj and hasattr(e.theta, "__cuda_array_interface__")
    rows = [{"check": label, "detail": f"{type(e).__name__}, {gpu.predictor.detail[:30]}",
             "moved": moved, "vs_cpu": vs_cpu, "pixels": min(agree),
             "ms": round(float(np.median(ms[1:] or ms)), 2),
             "ok": moved > 1e-6 and step > 0 and vs_cpu <= tol and min(agree) >= 0.99
             and fused and on_device}]
    if norm == "sample":
        stream = e.stream.ptr
        bad = []
        for role, s in e.sessions.opened().items():
            opts = s.get_provider_options().get("CUDAExecutionProvider", {})
            if opts.get("user_compute_stream") != str(stream) or opts.get("use_tf32") != "0":
                bad.append(role)
        rows.append({"check": "sessions", "detail": f"{len(e.sessions.opened())} on stream "
                     f"{stream}", "moved": ", ".join(bad) or "all on it, use_tf32=0",
                     "ok": not bad})
    gpu.close()
    ref.close()
    return rows


def tensorrt_rows(art: Path, images, cache: Path) -> list[dict]:
    from grata.engine_chooser import open_engine
    from grata.runtime.predictors import OrtPredictor
    from grata.runtime.tensorrt import TensorRTPredictor, has_reduced_precision, import_tensorrt

    trt = import_tensorrt()
    engine = open_engine(art, "cuda")
    cpu = OrtPredictor(art, threads=None)
    x = images[0][None]
    theta0 = engine.to_numpy(engine.theta0)
    rows = []
    p = TensorRTPredictor(art, precision="fp32", cache_dir=cache, stream=engine.stream)
    out, ref = p.predict(engine.to_input(x), engine.theta), cpu.predict(x, theta0)
    err = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))
    rows.append({"check": "tensorrt fp32", "detail": p.detail[:40], "moved": err,
                 "pixels": float(np.mean((out > 0) == (ref > 0))), "ok": err <= 2e-3})
    if has_reduced_precision(trt):
        half = TensorRTPredictor(art, precision="fp16", cache_dir=cache, stream=engine.stream)
        gamma = np.abs(theta0) >= 0.5
        base = np.where(gamma, theta0.astype(np.float16).astype(np.float32), theta0)
        moved = base + np.where(gamma, np.float32(1e-5), np.float32(0))
        a = half.predict(x, base.astype(np.float32))
        b = half.predict(x, moved.astype(np.float32))
        change = float(np.abs(a - b).max())
        rows.append({"check": "tensorrt fp16 step", "detail": "gamma + 1e-5",
                     "moved": change, "ok": change > 0})
    else:
        rows.append({"check": "tensorrt fp16 step", "detail": f"TensorRT {trt.__version__} "
                     "is strongly typed: no fp16 build", "moved": "-", "ok": True})
    engine.close()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the rows as JSON to this path")
    ap.add_argument("--size", type=int, default=128, help="image size (default 128)")
    ap.add_argument("--images", type=int, default=5, help="images per run (default 5)")
    ap.add_argument("--tol", type=float, default=0.05,
                    help="largest GPU-to-CPU theta distance relative to the move")
    args = ap.parse_args(argv)
    torch, why = cuda_torch()
    if torch is None:
        print(f"gpu_serve_check: SKIPPED: no GPU found ({why}); nothing was checked",
              flush=True)
        return SKIP_EXIT
    gone = missing()
    if gone:
        print(f"gpu_serve_check: SKIPPED: needs {', '.join(gone)}, not installed here "
              f"(pip install 'grata-edge[gpu,gpu-onnxruntime,export]'); nothing was checked",
              flush=True)
        return SKIP_EXIT
    use_checkout()
    from grata.export import export_artifacts
    from grata.models import save_checkpoint

    t0 = time.perf_counter()
    images = make_images(args.images, args.size, 0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_checkpoint(make_model("edge", 0), tmp / "edge.pt")
        export_artifacts(tmp / "edge.pt", "edge", args.size, tmp / "art")
        for norm in ("sample", "ema:0.1"):
            try:
                rows += serve_rows(tmp / "art", images, norm, args.tol)
            except Exception as e:  # noqa: BLE001  (a row that could not run is a failure)
                rows.append({"check": f"serve cuda {norm}", "moved": f"error: {e}"[:80],
                             "ok": False})
        if importlib.util.find_spec("tensorrt") is None:
            rows.append({"check": "tensorrt", "detail": "skipped: the tensorrt package is "
                         "not installed", "ok": True})
        else:
            try:
                rows += tensorrt_rows(tmp / "art", images, tmp / "trt")
            except Exception as e:  # noqa: BLE001
                rows.append({"check": "tensorrt", "moved": f"error: {e}"[:80], "ok": False})
    log(table(rows, [("check", "check", 20), ("detail", "detail", 42), ("moved", "value", 12),
                     ("vs_cpu", "vs cpu", 9), ("pixels", "pixels", 7), ("ms", "ms", 8)]))
    failed = [r for r in rows if not r["ok"]]
    log(f"{len(rows) - len(failed)}/{len(rows)} rows passed in "
        f"{time.perf_counter() - t0:.0f} s" + (f"; FAILED: {len(failed)}" if failed else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows}, f, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
