"""What the GPU checks share: grata from this checkout without installing it, the
no-GPU skip, and the one table they print.

A bare GPU machine has torch, CuPy or cuda-python, NVRTC and numpy, and nothing of this
project installed: `use_checkout` makes ``import grata.kernels`` (and the other stage
folders) resolve to this checkout, as the package's ``package-dir`` does once installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_EXIT = 0  # no GPU here: a skip, not a failure


def use_checkout() -> None:
    """Import grata from this checkout when it is not installed (nothing is installed)."""
    try:
        import grata.kernels
        return
    except ImportError:
        pass
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    for name in [m for m in sys.modules if m == "grata" or m.startswith("grata.")]:
        del sys.modules[name]
    import grata

    grata.__path__.append(str(ROOT))  # kernels/, runtime/, export/ as grata.kernels, ...


def cuda_torch():
    """torch when it sees a CUDA device, else (None, why) in one line."""
    try:
        import torch
    except ImportError:
        return None, "torch is not installed"
    if not torch.cuda.is_available():
        return None, "torch.cuda.is_available() is False"
    return torch, None


def skip(script: str, why: str) -> int:
    """Say clearly that nothing ran and why; the exit status of a skip."""
    print(f"{script}: SKIPPED: no GPU found ({why}); nothing was checked", flush=True)
    return SKIP_EXIT


def table(rows: list[dict], columns: list[tuple[str, str, int]]) -> str:
    """One fixed-width table: columns are (key, header, width); a row's ``ok`` (bool)
    is shown as PASS / FAIL in the last column."""
    head = " ".join(f"{h:<{w}}" for _, h, w in columns) + " result"
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for key, _, w in columns:
            v = r.get(key, "")
            if isinstance(v, float):
                v = f"{v:.3g}"
            cells.append(f"{v!s:<{w}}"[:max(w, 1)])
        lines.append(" ".join(cells) + (" PASS" if r.get("ok") else " FAIL"))
    return "\n".join(lines)
