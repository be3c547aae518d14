"""Helpers of the serving tests: fundus-like pictures, inboxes, the serve command line."""

import os
import time
from pathlib import Path

import numpy as np
from grata.runtime.adaptive import AdaptiveModel
from grata.runtime.state_file import STATE_FILE
from PIL import Image

SIZE = 64


def fundus(rng, size=96) -> np.ndarray:
    """A small fundus-like RGB picture: reddish retina, bright disc, paler cup, noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    cx, cy = rng.uniform(0.4, 0.6, 2)
    r = np.hypot(xx - cx, yy - cy)
    img = np.stack([0.6 + 0 * r, 0.25 + 0 * r, 0.1 + 0 * r])
    disc = r < rng.uniform(0.18, 0.25)
    cup = r < rng.uniform(0.06, 0.12)
    img[:, disc] = np.array([0.9, 0.55, 0.35])[:, None]
    img[:, cup] = np.array([0.97, 0.85, 0.6])[:, None]
    img = img * rng.uniform(0.7, 1.1, (3, 1, 1)) + rng.normal(0, 0.04, img.shape)
    return (np.clip(img, 0, 1).transpose(1, 2, 0) * 255).astype(np.uint8)


def make_inbox(folder: Path, n: int, seed: int = 0) -> list[str]:
    """n PNGs with distinct modification times in the past (arrival order = name order)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = time.time_ns() - 10**12
    names = []
    for i in range(n):
        name = f"eye{i:03d}.png"
        Image.fromarray(fundus(rng)).save(folder / name)
        os.utime(folder / name, ns=(base + i * 10**7, base + i * 10**7))
        names.append(name)
    return names


def serve_args(inbox, outbox, art, *extra):
    """`grata serve` in the paper's setting (--paper), which the in-memory reference runs
    (`AdaptiveModel`'s defaults); the product's rule is served in test_serve_norm_gate."""
    return ["serve", "--inbox", str(inbox), "--outbox", str(outbox), "--artifacts", str(art),
            "--paper", "--predictor", "onnxruntime", "--device", "cpu", "--threads", "1",
            "--poll", "0.02", "--settle", "0.2", "--stable-for", "0.5", *extra]


def load_state(state_dir: Path) -> dict:
    with np.load(state_dir / STATE_FILE, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def reference_run(art, folder: Path, names) -> list[str]:
    """theta digests after each image of an uninterrupted in-memory session."""
    with AdaptiveModel(art, None, predictor="onnxruntime", device="cpu", threads=1) as s:
        return [s.process(folder / n)["record"]["theta_sha256"] for n in names]


def temp_files(*folders) -> list[Path]:
    return [p for f in folders if f.is_dir() for p in f.iterdir()
            if p.name.startswith(".") and p.name.endswith(".tmp")]


def wait_for(condition, timeout: float, what: str, proc=None):
    """Poll `condition()` until it is true; fail the test (never hang) after `timeout`
    seconds or when `proc` (a Popen) has exited first. Returns the condition's value."""
    import pytest
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process exited (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def grata_script() -> str:
    """The installed console script `grata` beside this interpreter."""
    import shutil
    import sys
    here = Path(sys.executable).parent / "grata"
    return str(here) if here.exists() else (shutil.which("grata") or "grata")
