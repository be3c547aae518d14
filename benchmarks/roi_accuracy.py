"""Optic disc localisation on the synthetic whole photographs, per domain, against a
plain brightest-blob finder (the grey image smoothed at a disc's scale, its maximum).

Columns: n; median centre error in disc diameters (DD = the true vertical diameter);
share of photographs whose predicted centre lies in the true disc; share whose ROI
(the benchmark's rule, at the predicted centre) holds the whole disc; share rejected
(score below grata.roi.SCORE_THRESHOLD; a rejected photograph counts as a miss in the
other shares). The baseline's ROI uses the same side (from the found FOV). Extra rows:
source-domain photographs all with a bright rim artefact, all with strong uneven light.

    OMP_NUM_THREADS=1 python benchmarks/roi_accuracy.py [--n 40] [--width 1024]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from scipy import ndimage

os.environ.setdefault("OMP_NUM_THREADS", "1")

from grata import roi, synth, synth_whole  # noqa: E402


def brightest_blob(image):
    g = image.astype(np.float32).mean(axis=2)
    s = ndimage.gaussian_filter(g, 0.03 * max(image.shape[:2]))
    y, x = np.unravel_index(int(np.argmax(s)), s.shape)
    return x + 0.5, y + 0.5


def _row(image, mask, t, cx, cy, fov, rejected):
    if rejected:
        return np.nan, 0.0, 0.0, 1.0
    err = np.hypot(cx - t["cx"], cy - t["cy"]) / (2 * t["ry"])
    x, y = int(np.floor(cx)), int(np.floor(cy))
    inside = 0 <= y < mask.shape[0] and 0 <= x < mask.shape[1] and mask[y, x] < 255
    x0, y0, x1, y1 = roi.roi_box(image.shape, {"cx": cx, "cy": cy}, fov)
    ys, xs = np.nonzero(mask < 255)
    held = xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
    return err, float(inside), float(held), 0.0


def evaluate(name, renders):
    ours, base = [], []
    for image, mask, t in renders:
        d = roi.locate_disc(image)
        rejected = not d["score"] >= roi.SCORE_THRESHOLD
        ours.append(_row(image, mask, t, d["cx"], d["cy"], d["fov"], rejected))
        fov = d["fov"] or t["fov"]
        base.append(_row(image, mask, t, *brightest_blob(image), fov, False))
    o, b = np.array(ours), np.array(base)
    med = lambda a: np.nanmedian(a) if np.isfinite(a).any() else np.nan  # noqa: E731
    print(f"{name:18s} {len(o):4d} | {med(o[:, 0]):6.3f} {100 * o[:, 1].mean():6.1f} "
          f"{100 * o[:, 2].mean():6.1f} {100 * o[:, 3].mean():6.1f} | {med(b[:, 0]):6.3f} "
          f"{100 * b[:, 1].mean():6.1f} {100 * b[:, 2].mean():6.1f}")
    return o, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="photographs per domain")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    print(f"{'':18s} {'':4s} | {'locate_disc':^27s} | {'brightest blob':^20s}")
    print(f"{'domain':18s} {'n':>4s} | {'err/DD':>6s} {'in%':>6s} {'crop%':>6s} {'rej%':>6s} "
          f"| {'err/DD':>6s} {'in%':>6s} {'crop%':>6s}")
    every = []
    domains = [synth.SOURCE_DOMAIN, *synth_whole.TARGET_DOMAINS]
    for domain in domains:
        renders = (synth_whole.render_whole(synth_whole._rng(args.seed, domain, "test", i),
                                            domain, args.width) for i in range(args.n))
        every.append(evaluate(domain, renders))
    o = np.concatenate([e[0] for e in every])
    b = np.concatenate([e[1] for e in every])
    med = np.nanmedian
    print(f"{'all':18s} {len(o):4d} | {med(o[:, 0]):6.3f} {100 * o[:, 1].mean():6.1f} "
          f"{100 * o[:, 2].mean():6.1f} {100 * o[:, 3].mean():6.1f} | {med(b[:, 0]):6.3f} "
          f"{100 * b[:, 1].mean():6.1f} {100 * b[:, 2].mean():6.1f}")
    for label, kw in (("rim artefact", {"artefact": 1.5, "uneven": 0.0}),
                      ("uneven light", {"artefact": 0.0, "uneven": 0.9})):
        renders = (synth_whole.render_whole(synth_whole._rng(args.seed + 1, domain, "test", i),
                                            domain, args.width, **kw)
                   for i in range(args.n // 2) for domain in domains)
        evaluate(f"all+{label}", renders)
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
