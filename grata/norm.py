"""Where the BN statistics come from at test time: the choice and its arithmetic.

Torch-free (the device runtime uses it). A choice is a `NormSpec`, written as a short
string:

- ``source`` (alias ``running``): the running mean/variance stored by training;
- ``sample``: the statistics of the current image (biased variance over H, W; the paper);
- ``mix:A`` (A in [0, 1]) or ``mix:nN`` (an N-prior, a = 1 / (N + 1) for one image):
  per channel mu = (1-a) mu_src + a mu_img,
  var = (1-a) var_src + a var_img + a (1-a) (mu_img - mu_src)^2
  (the mean and variance of the mixture of the two distributions); a = 1 is ``sample``,
  a = 0 is ``source``;
- ``ema:M`` (momentum M in (0, 1]): statistics that follow the stream. A running estimate
  starts from the source statistics; each image is normalised with the estimate mixed
  with its own statistics at weight a (``ema:M,A`` or ``ema:M,nN``; a = M by default, so
  the image is normalised exactly with the estimate updated by itself), and after its
  prediction the estimate moves to that mixture:
  mu <- (1-M) mu + M mu_img, var <- (1-M) var + M var_img + M (1-M) (mu_img - mu)^2.
  The estimate belongs to the adapted state (reset and checkpointed with theta).

`NormSpec` is a `str` (its canonical text, e.g. ``"mix:0.2"``), so it compares, hashes,
prints and serialises as that text; its fields are `kind`, `alpha`, `momentum`, `prior_n`.

Statistics travel as one flat float32 vector in theta's layout (`grata.models.theta_layout`):
for each BN layer its C means where its weight sits, then its C variances where its bias
sits (`stats_views`).
"""

from __future__ import annotations

import math

from grata.errors import GrataError

KINDS = ("source", "sample", "mix", "ema")
ALIASES = {"running": "source"}
# Parameters when a spec gives none. Placeholders until measured defaults replace them:
# 0.2 is the weight of the forward-only check on real cameras (issue 10).
DEFAULT_MIX_ALPHA = 0.2
DEFAULT_EMA_MOMENTUM = 0.1
SYNTAX = "source, sample, mix[:A|:nN], ema[:M[,A|,nN]] (A in [0,1], N > 0, M in (0,1])"


def _num(text: str, what: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise GrataError(f"norm {spec!r}: {what} {text!r} is not a number; use {SYNTAX}")
    return value


def _fmt(x: float) -> str:
    return repr(float(x)).removesuffix(".0") if float(x).is_integer() else repr(float(x))


class NormSpec(str):
    """A parsed statistics choice; the string value is its canonical spec.

    `NormSpec("mix:n16")`; a bad spec is a one-line `GrataError`. Fields: `kind` (one of
    `KINDS`), `alpha` (weight of the current image: 0 for source, 1 for sample),
    `momentum` (ema only, else None), `prior_n` (N when the weight came from an N-prior).
    """

    kind: str
    alpha: float
    momentum: float | None
    prior_n: float | None

    def __new__(cls, spec="sample"):
        if isinstance(spec, NormSpec):
            return spec
        if not isinstance(spec, str):
            raise GrataError(f"norm must be a string such as 'mix:0.2', not {spec!r}")
        text = spec.strip().lower()
        kind, _, rest = text.partition(":")
        kind = ALIASES.get(kind, kind)
        if kind not in KINDS:
            raise GrataError(f"unknown norm {spec!r}; choose from {SYNTAX}")
        items = [p.strip() for p in rest.split(",")] if rest else []
        if kind in ("source", "sample") and items:
            raise GrataError(f"norm {spec!r}: {kind} takes no parameter")
        alpha = prior = momentum = None
        if kind == "ema":
            if items:
                momentum = _num(items.pop(0).removeprefix("m="), "momentum", spec)
            else:
                momentum = DEFAULT_EMA_MOMENTUM
            if not 0 < momentum <= 1:
                raise GrataError(f"norm {spec!r}: momentum must be in (0, 1], not {momentum}")
        if len(items) > 1:
            raise GrataError(f"norm {spec!r}: too many parameters; use {SYNTAX}")
        if items:
            item = items[0].removeprefix("a=")
            if item.startswith("n"):
                prior = _num(item.removeprefix("n").removeprefix("="), "prior N", spec)
                if not prior > 0:
                    raise GrataError(f"norm {spec!r}: the prior N must be positive")
            else:
                alpha = _num(item, "weight", spec)
                if not 0 <= alpha <= 1:
                    raise GrataError(f"norm {spec!r}: the weight must be in [0, 1], "
                                     f"not {alpha}")
        if kind == "source":
            alpha = 0.0
        elif kind == "sample":
            alpha = 1.0
        elif prior is not None:
            alpha = 1.0 / (prior + 1.0)  # n = 1 image against a prior worth N
        elif alpha is None:
            alpha = momentum if kind == "ema" else DEFAULT_MIX_ALPHA
        canon = kind
        if kind in ("mix", "ema"):
            parts = [] if kind == "mix" else [_fmt(momentum)]
            if prior is not None:
                parts.append(f"n{_fmt(prior)}")
            elif kind == "mix" or alpha != momentum:
                parts.append(_fmt(alpha))
            canon = f"{kind}:{','.join(parts)}"
        obj = super().__new__(cls, canon)
        obj.kind, obj.alpha, obj.momentum, obj.prior_n = kind, float(alpha), momentum, prior
        return obj

    def __getnewargs__(self):  # copy / pickle re-parse the canonical text
        return (str(self),)

    def __repr__(self) -> str:
        return f"NormSpec({str(self)!r})"


def parse_norm(norm="sample", alpha: float | None = None, prior_n: float | None = None,
               momentum: float | None = None) -> NormSpec:
    """A `NormSpec` from a spec string (or NormSpec) plus optional keyword parameters:
    ``parse_norm("mix", alpha=0.3)``, ``parse_norm("mix", prior_n=16)``,
    ``parse_norm("ema", momentum=0.05)``. A parameter given twice or that the kind does
    not take is a `GrataError`."""
    spec = NormSpec(norm)
    if alpha is None and prior_n is None and momentum is None:
        return spec
    where = f"norm {str(norm)!r}"
    if ":" in str(norm):  # (a parsed mix/ema NormSpec always carries its parameters)
        raise GrataError(f"{where}: give its parameters in the spec or as keywords, "
                         f"not both")
    if alpha is not None and prior_n is not None:
        raise GrataError(f"{where}: give alpha or prior_n, not both")
    if spec.kind not in ("mix", "ema") and (alpha, prior_n, momentum) != (None,) * 3:
        raise GrataError(f"{where}: {spec.kind} takes no alpha, prior_n or momentum")
    if momentum is not None and spec.kind != "ema":
        raise GrataError(f"{where}: momentum is for ema only")
    parts = [] if momentum is None else [_fmt(momentum)]
    if spec.kind == "ema" and not parts and (alpha is not None or prior_n is not None):
        parts.append(_fmt(DEFAULT_EMA_MOMENTUM))
    if prior_n is not None:
        parts.append(f"n{_fmt(prior_n)}")
    elif alpha is not None:
        parts.append(_fmt(alpha))
    return NormSpec(f"{spec.kind}:{','.join(parts)}")


def stats_views(layout: list[dict]) -> list[tuple[slice, slice]]:
    """For each BN layer, the (mean, variance) slices of a flat statistics vector."""
    out = []
    for w, b in zip(layout[0::2], layout[1::2]):
        n = int(w["shape"][0])
        out.append((slice(w["offset"], w["offset"] + n), slice(b["offset"], b["offset"] + n)))
    return out


def mix_stats(mean_src, var_src, mean_img, var_img, alpha: float):
    """The mixture's (mean, variance) at weight `alpha` of the image (any array type)."""
    d = mean_img - mean_src
    mean = (1 - alpha) * mean_src + alpha * mean_img
    var = (1 - alpha) * var_src + alpha * var_img + alpha * (1 - alpha) * d * d
    return mean, var


def ema_update(stats, img_stats, momentum: float, layout: list[dict]) -> None:
    """Move the stream estimate `stats` (flat, in place) towards one image's statistics:
    the mixture at weight `momentum`. Works on numpy, torch and CuPy vectors."""
    m = float(momentum)
    views = stats_views(layout)
    diff2 = img_stats - stats
    diff2 = diff2 * diff2  # (mu_img - mu)^2 at the mean positions, before the update
    stats *= 1 - m
    stats += m * img_stats
    for mean, var in views:
        stats[var] += m * (1 - m) * diff2[mean]
