"""Tables of `grata bench` reports (the JSON holds everything; these are for reading)."""

from __future__ import annotations

from grata.bench.settings import FORWARDS_PER_IMAGE


def _mb(x) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


def _rate(x) -> str:
    return "-" if x is None else f"{x / 1e3:.0f}k" if x >= 1e4 else f"{x:.1f}"


def _ms(x) -> str:
    return "-" if x is None else f"{x:.2f}" if x < 100 else f"{x:.1f}" if x < 1000 else f"{x:.0f}"



def format_stages(report: dict) -> str:
    s = report["settings"]
    lines = [_header(report, f"{s['arch']} {s['size']}x{s['size']}, warm-up {s['warmup']}, "
                     + (f"{s['duration_s']} s per stage" if s["duration_s"]
                        else f"{s['iterations']} iterations") + f", {s['threads']} threads")]
    head = (f"{'backend':14} {'prec':5} {'stage':17} {'min':>8} {'mean':>8} {'median':>8} "
            f"{'p90':>8} {'p99':>8} {'1/s':>7} {'peakRSS':>8} {'devMB':>6}")
    lines += [head + "   (ms; memory MiB)", "-" * len(head)]
    for r in report["results"]:
        tag = f"{r['backend']:14} {r['precision']:5}"
        if r.get("skipped") or r.get("error"):
            lines.append(f"{tag} {'skipped: ' + r['skipped'] if r.get('skipped') else 'error: ' + r['error']}")
            continue
        mem = r["memory"]
        for k, (name, st) in enumerate(r["stages"].items()):
            tput = st["throughput_per_s"]
            lines.append(
                f"{tag if k == 0 else ' ' * len(tag)} {name:17} {_ms(st['min_ms']):>8} "
                f"{_ms(st['mean_ms']):>8} {_ms(st['median_ms']):>8} {_ms(st['p90_ms']):>8} "
                f"{_ms(st['p99_ms']):>8} {_rate(tput):>7} "
                f"{_mb(mem['peak_rss_bytes']) if k == 0 else '':>8} "
                f"{_mb(mem.get('device_peak_bytes')) if k == 0 else '':>6}")
    for r in report["results"]:
        if r.get("scale"):
            lines += ["", format_scale(r)]
    return "\n".join(lines)


def format_scale(row: dict) -> str:
    """The scale stage of one backend row: per stream and over all streams, the first
    images (the stream's estimate not yet settled) and the settled ones: images, median /
    mean ms per image (locate and the step), the locate step's median, its source passes
    (mean, max) and the extra ones beyond the crop as given's (mean, max), decisions."""
    sc = row["scale"]
    head = (f"{'stream':8} {'phase':8} {'images':>6} {'median':>8} {'mean':>8} "
            f"{'locate':>8} {'passes':>6} {'max':>4} {'extra':>6} {'max':>4}  decisions")
    lines = [f"scale stage, {row['backend']} {row['precision']}: per image, the locate step "
             "(source passes counted) then the GraTa step at the box (ms); extra = passes "
             "beyond the one on the crop as given", head, "-" * len(head)]
    groups = [(name, p) for name, phases in sc["streams"].items() for p in phases.items()]
    groups += [("all", ("first", sc["first"])), ("all", ("settled", sc["settled"]))]
    for name, (phase, st) in groups:
        if st is None:
            lines.append(f"{name:8} {phase:8} {0:>6}")
            continue
        how = ", ".join(f"{k} {v}" for k, v in st["how"].items())
        lines.append(f"{name:8} {phase:8} {st['images']:>6} {_ms(st['median_ms']):>8} "
                     f"{_ms(st['mean_ms']):>8} {_ms(st['locate_median_ms']):>8} "
                     f"{st['passes_mean']:6.2f} {st['passes_max']:>4} "
                     f"{st['extra_mean']:6.2f} {st['extra_max']:>4}  {how}")
    settled = sc["settled"]
    if settled is not None:
        ok = "yes" if settled["extra_max"] <= 1 else "NO"
        lines.append(f"settled streams: at most {settled['extra_max']} extra pass(es) per "
                     f"image (at most one: {ok}); {settled['passes_max']} source pass(es) "
                     "in all at most")
    return "\n".join(lines)


def _header(report: dict, what: str) -> str:
    m, v = report["machine"], report["versions"]
    gpu = report.get("gpu")
    load = m.get("load_average")
    parts = [f"grata bench {report['suite']}: {what}",
             (f"machine: {m['cpu']} ({m['logical_cpus']} logical CPUs, {m['physical_cores']} "
              f"cores{', ' + m['board'] if m.get('board') else ''}), "
              f"{_mb(m['memory_bytes'])} MiB RAM, {m['platform']}"),
             f"gpu: {gpu['name'] if gpu else 'none'}; load average at start: "
             + (" ".join(f"{x:.2f}" for x in load) if load else "n/a"),
             "versions: " + ", ".join(f"{k} {val}" for k, val in v.items()
                                      if k != "onnxruntime_providers"),
             f"date: {m['date_utc']}"]
    return "\n".join(parts)



def _x(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _count(n) -> str:
    return "-" if n is None else f"{n / 1e3:.0f}k" if n >= 10_000 else str(n)


def _load(r: dict) -> str:
    a, b = r.get("load_before"), r.get("load_after")
    return "-" if not a or not b else f"{a[0]:.1f}/{b[0]:.1f}"


def format_adapt(report: dict) -> str:
    """One row per (arch, size, backend): median s/img (p90, min), time / ref, peak RSS
    and its ratio, minor page faults per image (median), GFLOP/img, GFLOP/s, the
    dense-conv limit of the same worker and the
    fraction of it, start-up, load average (1 min) before / after the worker."""
    s, mm = report["settings"], report["matmul"]
    lines = [_header(report, f"GraTa per image, {s['images']} images after {s['warmup']} "
                             f"warm-up, {s['threads']} threads"),
             f"float32 matmul {mm['n']}x{mm['n']}: "
             + (f"torch {mm['torch_gflops']:.0f} GFLOP/s, " if "torch_gflops" in mm else "")
             + f"numpy {mm['numpy_gflops']:.0f} GFLOP/s; FLOPs/image = "
             f"{FORWARDS_PER_IMAGE} x forward; limit = "
             + (s.get("limit") or "not measured")]
    head = (f"{'arch':9} {'size':>4} {'backend':26} {'median s':>9} {'p90 s':>7} "
            f"{'min s':>7} {'time/ref':>8} {'peakRSS':>8} {'RSS/ref':>7} {'faults':>8} {'GFLOP/img':>9} "
            f"{'GFLOP/s':>8} {'limit':>7} {'%limit':>6} {'start s':>7} {'load':>9}")
    lines += [head, "-" * len(head)]
    for r in report["results"]:
        tag = f"{r['arch']:9} {r['size']:>4} {r['backend'][:26]:26}"
        if r.get("error"):
            lines.append(f"{tag} error: {r['error']}")
            continue
        st, limit = r["per_image"], r.get("limit")
        frac = r.get("limit_fraction")
        start = r.get("startup_s")
        lim = "-" if not limit else f"{limit['gflops_per_s']:.1f}"
        lines.append(f"{tag} {st['median_ms'] / 1e3:9.3f} {st['p90_ms'] / 1e3:7.3f} "
                     f"{st['min_ms'] / 1e3:7.3f} {_x(r.get('time_vs_torch_ref')):>8} "
                     f"{_mb(r['memory']['peak_rss_bytes']):>8} "
                     f"{_x(r.get('peak_rss_vs_torch_ref')):>7} "
                     f"{_count(r.get('faults_per_image')):>8} "
                     f"{r['flops_per_image'] / 1e9:9.1f} {r['gflops_per_s']:8.1f} "
                     f"{lim:>7} "
                     f"{'-' if frac is None else f'{100 * frac:.0f}%':>6} "
                     f"{'-' if start is None else f'{start:.2f}':>7} {_load(r):>9}")
    return "\n".join(lines)
