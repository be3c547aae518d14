"""GPU check of the fused GraTa update kernel: numbers, streams, graphs, launches, bandwidth.

One command on a machine with a CUDA GPU, installing nothing (torch, cuda-python with
cuda-core, NVRTC and numpy are all it imports; grata comes from this checkout):

    python benchmarks/gpu_kernel_check.py [--out kernel_check.json]

Rows of the one table it prints:

* ``float64``: the kernel (every launch shape the length allows) against a float64
  reference computed on the host, at 10^3 .. 10^7 parameters, inputs at odd offsets
  inside buffers poisoned with NaN; every element of theta, m and v within a bound derived
  from float32 rounding, cos within 2e-6, the guards untouched; plain Adam likewise.
* ``two streams``: two independent problems updated step by step on two streams at once,
  each step's results bitwise equal to the same steps run alone (each stream has its own
  workspace and grid-barrier counters).
* ``graph replay``: one update captured in a CUDA graph and replayed, bitwise equal to the
  same updates launched one by one.
* ``launches``: kernel launches per update, counted by torch's profiler (1 expected).
* ``bandwidth``: the update at 10^7 parameters against the device's copy bandwidth,
  counting the 32 bytes per element an update must move (target 0.8; reported, and a
  failure only with --strict).

Sizes are fixed, so it finishes in well under 5 minutes on one GPU (NVRTC's first
compile included). Exit status: 0 everything passed (or no GPU: a skip, said so), 1 any
mismatch.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import numpy as np
from gpu_checkout import cuda_torch, skip, table, use_checkout

B1, B2, EPS, BETA = 0.9, 0.999, 1e-8, 1e-4
U32 = 2.0**-24
SIZES = (1_000, 10_000, 100_000, 1_000_000, 10_000_000)
BYTES_MIN = 32  # per element: read theta, m, v, g_p, g_a; write theta, m, v
BANDWIDTH_TARGET = 0.8
GUARD = 8


def log(*a):
    print(*a, flush=True)


def random_inputs(rng, n: int) -> dict:
    th = (rng.uniform(0.5, 1.5, n) * rng.choice([-1.0, 1.0], n)).astype(np.float32)
    gp = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    return {"theta": th, "m": (rng.standard_normal(n) * 1e-4).astype(np.float32),
            "v": rng.uniform(0, 1e-6, n).astype(np.float32), "g_p": gp,
            "g_a": (0.3 * gp + rng.standard_normal(n) * 1e-3).astype(np.float32)}


def reference64(h: dict, t: int, lr: float | None = None):
    """(cos, theta, m, v, step, denom) in float64: GraTa's rule, or Adam at `lr`."""
    f = np.float64
    p, a = h["g_p"].astype(f), h["g_a"].astype(f)
    cos = float(np.dot(p, a) / (math.sqrt(np.dot(p, p)) * math.sqrt(np.dot(a, a)) + 1e-12))
    eta = BETA * (cos + 1) ** 2 / 4 if lr is None else lr
    step = eta / (1 - B1**t)
    m = B1 * h["m"].astype(f) + (1 - B1) * p
    v = B2 * h["v"].astype(f) + (1 - B2) * p * p
    denom = np.sqrt(v) / math.sqrt(1 - B2**t) + EPS
    return cos, h["theta"].astype(f) - step * m / denom, m, v, step, denom


def worst_ratio(got: dict, h: dict, ref, adam: bool) -> float:
    """Largest |error| / bound over theta, m and v (<= 1 passes; inf for a NaN)."""
    _, th, m, v, step, denom = ref
    f = np.float64
    tol_m = 4 * U32 * (B1 * np.abs(h["m"].astype(f)) + (1 - B1) * np.abs(h["g_p"])) + 1e-37
    tol_v = 4 * U32 * np.abs(v) + 1e-37
    moved = np.abs(th - h["theta"].astype(f))
    rel_lr = 8 * U32 if adam else 1e-5  # the device cos shifts eta slightly
    tol_th = 2 * U32 * np.abs(th) + (rel_lr + 8 * U32) * moved + step * tol_m / denom + 1e-37
    worst = 0.0
    for key, want, tol in (("theta", th, tol_th), ("m", m, tol_m), ("v", v, tol_v)):
        r = np.abs(got[key].astype(f) - want) / tol
        worst = max(worst, float(np.max(np.where(np.isfinite(r), r, np.inf))))
    return worst


class Guarded:
    """Device float32 arrays at an element offset inside NaN-filled buffers."""

    def __init__(self, torch, h: dict, offset: int):
        self.parts = {}
        for key, a in h.items():
            buf = torch.full((a.size + 2 * GUARD + 4,), float("nan"), device="cuda")
            view = buf[GUARD + offset:GUARD + offset + a.size]
            view.copy_(torch.from_numpy(a))
            self.parts[key] = (buf, GUARD + offset, view)

    def __getitem__(self, key):
        return self.parts[key][2]

    def host(self, key) -> np.ndarray:
        return self.parts[key][2].cpu().numpy()

    def guards_intact(self) -> bool:
        for buf, start, view in self.parts.values():
            b = buf.cpu().numpy()
            if not (np.isnan(b[:start]).all() and np.isnan(b[start + view.numel():]).all()):
                return False
        return True


def modes_for(n: int, st, cuda_update) -> list[str]:
    modes = ["auto", "two"]
    if n <= 100_000:
        modes.append("single")
    if st.cooperative and n > cuda_update.SINGLE_BLOCK_MAX_N:
        modes.append("cooperative")
    return modes


def check_float64(torch, kernels, cuda_update, st, rng) -> list[dict]:
    rows = []
    for n in SIZES:
        for mode in modes_for(n, st, cuda_update):
            h, t = random_inputs(rng, n), int(rng.integers(1, 50))
            g = Guarded(torch, h, offset=1)  # 4-byte, not 16-byte, aligned
            cos_out = torch.full((1,), float("nan"), device="cuda")
            kernels.grata_update(g["theta"], g["m"], g["v"], g["g_p"], g["g_a"], t, BETA,
                                 (B1, B2), EPS, cos_out=cos_out, mode=mode)
            shape = cuda_update.last_launch.get("shape")
            torch.cuda.synchronize()
            ref = reference64(h, t)
            worst = worst_ratio({k: g.host(k) for k in ("theta", "m", "v")}, h, ref, False)
            cos_err = abs(float(cos_out[0]) - ref[0])
            ok = worst <= 1.0 and cos_err <= 2e-6 and g.guards_intact()
            rows.append({"check": "float64", "n": n, "detail": f"{mode}->{shape}",
                         "value": worst, "unit": "err/bound", "cos_err": cos_err, "ok": ok})
    for n in (SIZES[0], SIZES[3]):
        h, lr = random_inputs(rng, n), 1e-3
        g = Guarded(torch, {k: h[k] for k in ("theta", "m", "v", "g_p")}, offset=1)
        kernels.adam_update(g["theta"], g["m"], g["v"], g["g_p"], 3, lr, (B1, B2), EPS)
        torch.cuda.synchronize()
        h["g_a"] = h["g_p"]
        worst = worst_ratio({k: g.host(k) for k in ("theta", "m", "v")}, h,
                            reference64(h, 3, lr), True)
        rows.append({"check": "float64", "n": n, "detail": "adam", "value": worst,
                     "unit": "err/bound", "ok": worst <= 1.0 and g.guards_intact()})
    return rows


def check_two_streams(torch, kernels, cuda_update, rng, n: int = 1_000_000,
                      steps: int = 10) -> dict:
    """Two problems interleaved on two streams == each run alone, bit for bit."""
    problems = [random_inputs(rng, n) for _ in range(2)]

    def run(concurrent: bool):
        dev = [{k: torch.from_numpy(a).cuda() for k, a in p.items()} for p in problems]
        outs = [torch.zeros(steps, device="cuda") for _ in dev]
        streams = [torch.cuda.Stream() for _ in dev] if concurrent else \
            [torch.cuda.current_stream()] * 2
        torch.cuda.synchronize()
        for t in range(1, steps + 1):
            for d, s, o in zip(dev, streams, outs):
                with torch.cuda.stream(s):
                    kernels.grata_update(d["theta"], d["m"], d["v"], d["g_p"], d["g_a"],
                                         t, BETA, cos_out=o[t - 1:t])
        torch.cuda.synchronize()
        if concurrent:  # the kernel's caches must not outlive the streams
            for s in streams:
                cuda_update.release_stream(s)
        return [(d["theta"].cpu().numpy(), d["m"].cpu().numpy(), o.cpu().numpy())
                for d, o in zip(dev, outs)]

    alone, both = run(False), run(True)
    same = all(np.array_equal(x, y) for a, b in zip(alone, both) for x, y in zip(a, b))
    return {"check": "two streams", "n": n, "detail": f"{steps} steps each",
            "value": "bitwise equal" if same else "DIFFER", "ok": same}


def check_graph_replay(torch, kernels, cuda_update, rng, n: int, replays: int = 5) -> dict:
    """An update captured in a CUDA graph and replayed == the same updates eagerly."""
    h = random_inputs(rng, n)
    try:
        dev = {k: torch.from_numpy(a).cuda() for k, a in h.items()}
        eager = {k: torch.from_numpy(a).cuda() for k, a in h.items()}
        cos_g, cos_e = torch.zeros(1, device="cuda"), torch.zeros(1, device="cuda")
        s = torch.cuda.Stream()
        warm = {k: v.clone() for k, v in dev.items()}
        with torch.cuda.stream(s):  # the stream's workspace exists before the capture
            kernels.grata_update(warm["theta"], warm["m"], warm["v"], warm["g_p"],
                                 warm["g_a"], 1, BETA, cos_out=cos_g)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=s):
            kernels.grata_update(dev["theta"], dev["m"], dev["v"], dev["g_p"], dev["g_a"],
                                 1, BETA, cos_out=cos_g)
        for _ in range(replays):
            graph.replay()
        for _ in range(replays):
            kernels.grata_update(eager["theta"], eager["m"], eager["v"], eager["g_p"],
                                 eager["g_a"], 1, BETA, cos_out=cos_e)
        torch.cuda.synchronize()
        same = all(torch.equal(dev[k], eager[k]) for k in ("theta", "m", "v")) and \
            torch.equal(cos_g, cos_e)
        moved = not torch.equal(dev["theta"].cpu(), torch.from_numpy(h["theta"]))
        value = "bitwise equal" if same else "DIFFER"
        ok = same and moved
        cuda_update.release_stream(s)
    except Exception as e:  # noqa: BLE001  (a capture the platform refuses is a failure)
        value, ok = f"error: {str(e)[:60]}", False
    return {"check": "graph replay", "n": n, "detail": f"{replays} replays", "value": value,
            "ok": ok}


def launches(torch, fn) -> float | None:
    """Kernel launches per call of fn, from torch's profiler (None if unavailable)."""
    try:
        from torch.profiler import ProfilerActivity, profile
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        count = 0
        for ev in prof.events():
            kind = getattr(ev.device_type, "name", str(ev.device_type))
            low = ev.name.lower()
            if kind == "CUDA" and "memcpy" not in low and "memset" not in low:
                count += 1
        return count / 5
    except Exception:  # noqa: BLE001
        return None


def check_launches(torch, kernels, cuda_update, st, rng) -> list[dict]:
    rows = []
    for n in (19_136, SIZES[-1]):
        dev = {k: torch.from_numpy(a).cuda() for k, a in random_inputs(rng, n).items()}
        cos = torch.zeros(1, device="cuda")

        def update(dev=dev, cos=cos):
            kernels.grata_update(dev["theta"], dev["m"], dev["v"], dev["g_p"], dev["g_a"],
                                 1, BETA, cos_out=cos)
        count = launches(torch, update)
        expected = len(cuda_update.last_launch.get("kernels", []))
        rows.append({"check": "launches", "n": n,
                     "detail": f"{cuda_update.last_launch.get('shape')}, expect {expected}",
                     "value": "-" if count is None else count, "unit": "per update",
                     # one fused launch; two only where cooperative launches are missing
                     "ok": count == expected and (expected == 1 or not st.cooperative)})
    return rows


def median_us(torch, fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def check_bandwidth(torch, kernels, rng, strict: bool) -> dict:
    n = SIZES[-1]
    src = torch.ones(64 * 2**20, device="cuda")
    dst = torch.empty_like(src)
    copy_gbs = 8 * src.numel() / (median_us(torch, lambda: dst.copy_(src), 20) * 1e-6) / 1e9
    src = dst = None  # 512 MB back before the update's buffers
    dev = {k: torch.from_numpy(a).cuda() for k, a in random_inputs(rng, n).items()}
    cos = torch.zeros(1, device="cuda")
    us = median_us(torch, lambda: kernels.grata_update(
        dev["theta"], dev["m"], dev["v"], dev["g_p"], dev["g_a"], 1, BETA, cos_out=cos), 20)
    frac = BYTES_MIN * n / (us * 1e-6) / 1e9 / copy_gbs
    return {"check": "bandwidth", "n": n,
            "detail": f"{us:.0f} us, copy {copy_gbs:.0f} GB/s, target {BANDWIDTH_TARGET}",
            "value": frac, "unit": "of copy", "ok": frac >= BANDWIDTH_TARGET or not strict,
            "target_met": frac >= BANDWIDTH_TARGET}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the rows as JSON to this path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strict", action="store_true",
                    help=f"fail when the bandwidth target ({BANDWIDTH_TARGET}) is missed")
    args = ap.parse_args(argv)
    torch, why = cuda_torch()
    if torch is None:
        return skip("gpu_kernel_check", why)
    use_checkout()
    from grata.kernels import cuda_update

    from grata import kernels

    t0 = time.perf_counter()
    st = cuda_update._state(torch.cuda.current_device())  # compiles (or loads) the kernel
    props = torch.cuda.get_device_properties(0)
    log(f"device {props.name} ({st.arch}, {st.sm_count} SMs, cooperative "
        f"{st.cooperative}); kernel ready in {time.perf_counter() - t0:.1f} s")
    rng = np.random.default_rng(args.seed)
    rows = check_float64(torch, kernels, cuda_update, st, rng)
    rows.append(check_two_streams(torch, kernels, cuda_update, rng))
    rows.append(check_graph_replay(torch, kernels, cuda_update, rng, SIZES[0]))
    rows.append(check_graph_replay(torch, kernels, cuda_update, rng, SIZES[3]))
    rows += check_launches(torch, kernels, cuda_update, st, rng)
    rows.append(check_bandwidth(torch, kernels, rng, args.strict))
    log(table(rows, [("check", "check", 12), ("n", "n", 9), ("detail", "detail", 40),
                     ("value", "value", 14), ("unit", "unit", 10)]))
    failed = [r for r in rows if not r["ok"]]
    log(f"{len(rows) - len(failed)}/{len(rows)} rows passed in "
        f"{time.perf_counter() - t0:.0f} s" + ("" if not failed else
                                               f"; FAILED: {len(failed)}"))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": props.name, "arch": st.arch, "rows": rows}, f, indent=1,
                      default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
