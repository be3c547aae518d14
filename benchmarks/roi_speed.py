"""Time of grata.roi.locate_disc (the localisation alone) and of prepare (localisation
and crop) on whole photographs of about 2 MP, one thread.

    OMP_NUM_THREADS=1 python benchmarks/roi_speed.py [--width 1632] [--repeat 20]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")

from grata import roi, synth, synth_whole  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1632, help="photograph width (height 0.78x)")
    ap.add_argument("--images", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    photos = [synth_whole.render_whole(synth_whole._rng(0, d, "test", i), d, args.width)[0]
              for i, d in zip(range(args.images),
                              [synth.SOURCE_DOMAIN, *synth.TARGET_DOMAINS] * args.images)]
    h, w = photos[0].shape[:2]
    print(f"{len(photos)} photographs {w}x{h} ({w * h / 1e6:.2f} MP), {args.repeat} calls each")
    for name, fn in (("locate_disc", roi.locate_disc), ("prepare", roi.prepare)):
        fn(photos[0])  # warm-up
        times = []
        for p in photos:
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                fn(p)
                times.append(time.perf_counter() - t0)
        t = np.array(times) * 1e3
        print(f"{name:12s} median {np.median(t):6.1f} ms  p90 {np.percentile(t, 90):6.1f} ms"
              f"  min {t.min():6.1f} ms")


if __name__ == "__main__":
    main()
