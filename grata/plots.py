"""Plots of an adaptation run drawn with matplotlib (Agg, no display), returned as PNG bytes.

matplotlib is an optional dependency (the `report` extra): it is imported here only, when a
plot is asked for, so the device runtime never needs it.
"""

from __future__ import annotations

import io
import math

from grata.errors import GrataError

# One colour per method (matplotlib's default cycle, fixed so pages look alike).
COLOURS = ("#595959", "#1f77b4", "#ff7f0e", "#d62728", "#2ca02c", "#9467bd", "#8c564b")


def matplotlib_figure():
    """matplotlib's Figure class, or a one-line GrataError saying how to install it."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise GrataError("the report's plots need matplotlib: pip install "
                         "'grata-edge[report]' (or pass plots=False)") from None
    return Figure


def running_mean(values) -> list[float | None]:
    """Mean of the first k finite values, for every k (None until one is finite)."""
    out, total, n = [], 0.0, 0
    for v in values:
        if v is not None and math.isfinite(v):
            total, n = total + v, n + 1
        out.append(total / n if n else None)
    return out


def dice_stream_png(target: str, series: dict[str, list[float | None]], dpi: int = 100) -> bytes:
    """One domain's stream: per method, each image's mean Dice (faint) and the running mean.

    `series` maps a method to its per-image Dice in stream order (None where missing).
    """
    Figure = matplotlib_figure()
    from matplotlib.ticker import MaxNLocator
    fig = Figure(figsize=(6.0, 2.8), dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    for k, (method, vals) in enumerate(series.items()):
        c = COLOURS[k % len(COLOURS)]
        x = list(range(1, len(vals) + 1))
        y = [math.nan if v is None else v for v in vals]
        ax.plot(x, y, color=c, alpha=0.25, linewidth=0.8, marker=".", markersize=3)
        rm = [math.nan if v is None else v for v in running_mean(vals)]
        ax.plot(x, rm, color=c, linewidth=1.8, label=method)
    ax.set_title(f"{target}: Dice (OD+OC)/2 over the stream", fontsize=10)
    ax.set_xlabel("image in arrival order", fontsize=9)
    ax.set_ylabel("Dice (%)", fontsize=9)
    ax.set_ylim(0, 100)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=8)
    if series:
        ax.legend(fontsize=8, loc="lower right", title="line: running mean",
                  title_fontsize=7, ncols=min(len(series), 4))
    buf = io.BytesIO()
    # No "Software" text chunk: the page must carry no address, not even inside a PNG.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
