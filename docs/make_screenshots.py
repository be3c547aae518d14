"""Write the README's screenshots of the HTML reports: docs/report_adapt.png, report_serve.png.

    python docs/make_screenshots.py [--out docs]

A small real run of each: `grata adapt` of the shipped checkpoint on a synthetic benchmark
(two target domains, eight images each, methods source / bn / grata, overlays) and
`grata serve` of its export on sixteen photographs of two other domains. Each report.html
is opened in headless Chromium (Debian package `chromium`, no network) at 1280 px; the
PNG is reduced to 256 colours to keep it small. Needs the `dev` extra (torch, onnx,
matplotlib). About a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image


def screenshot(page: Path, png: Path, width: int, height: int) -> None:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        sys.exit("make_screenshots: chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([exe, "--headless=new", "--disable-gpu", "--no-sandbox",
                        "--no-first-run", f"--user-data-dir={profile}",
                        "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
                        f"--window-size={width},{height}", "--hide-scrollbars",
                        "--virtual-time-budget=5000", f"--screenshot={png}", page.as_uri()],
                       check=True, capture_output=True, timeout=180)
    # 256 colours: the page is flat colours, text and small photographs
    Image.open(png).convert("RGB").quantize(256, dither=Image.Dither.NONE).save(
        png, optimize=True)


def adapt_run(work: Path) -> Path:
    from grata import defaults
    from grata.cli import main
    from grata.synth import SOURCE_DOMAIN, generate

    generate(work / "data", seed=0, n_source=(1, 1), n_target=(5, 3), size=256,
             progress=False)
    out = work / "run"
    rc = main(["adapt", "--data", str(work / "data"), "--source", SOURCE_DOMAIN,
               "--targets", "Handheld,Widefield", "--checkpoint", str(defaults.checkpoint()),
               "--arch", defaults.DEFAULT_ARCH, "--size", str(defaults.DEFAULT_SIZE),
               "--engine", "torch", "--methods", "source,bn,grata", "--overlays", "--plot",
               "--quiet", "--out", str(out)])
    if rc != 0:
        sys.exit("make_screenshots: grata adapt failed")
    return out


def serve_run(work: Path) -> Path:
    from grata.export import export_artifacts

    from grata import defaults
    from grata.runtime.adaptive import AdaptiveModel
    from grata.runtime.inbox import serve

    art = work / "artifacts"
    export_artifacts(defaults.checkpoint(), defaults.DEFAULT_ARCH, defaults.DEFAULT_SIZE, art)
    inbox, outbox = work / "inbox", work / "outbox"
    inbox.mkdir()
    photos = [p for pair in zip(sorted((work / "data" / "LowLight").rglob("image/*")),
                                sorted((work / "data" / "Legacy").rglob("image/*")))
              for p in pair]
    base = time.time_ns() - 10**12
    for k, p in enumerate(photos):  # arrival order: the files' modification times
        dest = inbox / f"patient{k + 1:02d}_OD{p.suffix}"
        shutil.copy(p, dest)
        os.utime(dest, ns=(base + k * 10**9, base + k * 10**9))
    with AdaptiveModel(art, outbox / ".state", predictor="onnxruntime", device="cpu") as s:
        serve(inbox, outbox, s, once=True, settle_s=0.1, poll_s=0.05, log=None)
    return outbox


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                    help="folder for the PNGs (default: docs/)")
    args = ap.parse_args()
    from grata.report_html import write_adapt_html, write_serve_html

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        page = write_adapt_html(adapt_run(work))
        screenshot(page, args.out / "report_adapt.png", 1280, 1500)
        page = write_serve_html(serve_run(work))
        screenshot(page, args.out / "report_serve.png", 1280, 820)
    for name in ("report_adapt.png", "report_serve.png"):
        print(f"{args.out / name}: {(args.out / name).stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
