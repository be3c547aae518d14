"""Serving's guards around the per-image pipeline (`grata.pipeline.ImagePipeline`'s
`guard`): what keeps an adapted model that runs unattended from drifting or serving
garbage.

Per image: the method's own guard (a non-finite loss, gradient, theta or moment restores
the last good theta and moments; listed here as a reset), a drift bound (``max_drift``:
the relative L2 distance ``|theta - theta0| / |theta0|``; above it theta, the moments and
the step count return to their values before this image, or to the source when those are
also too far) and a finite-prediction check (non-finite logits restore the last good
state and predict again; if they are still non-finite the image is a DataError). Every
reset is returned for the image's record; `theta_version` counts the new thetas (a step
that moved theta, a restore).
"""

from __future__ import annotations

import numpy as np

from grata.errors import DataError, GrataError
from grata.runtime.record import finite_or_none

DEFAULT_MAX_DRIFT = 0.5


def relative_drift(theta, theta0) -> float:
    """|theta - theta0| / |theta0| (L2 over the whole vector)."""
    t = np.asarray(theta, dtype=np.float64)
    t0 = np.asarray(theta0, dtype=np.float64)
    return float(np.linalg.norm(t - t0) / max(np.linalg.norm(t0), 1e-12))


class Guards:
    """The drift bound (`max_drift`; None disables it) and the finite-prediction check,
    and the count of new thetas (`theta_version`)."""

    def __init__(self, max_drift: float | None = DEFAULT_MAX_DRIFT):
        if max_drift is not None and not max_drift > 0:
            raise GrataError(f"max_drift must be positive, not {max_drift}")
        self.max_drift = None if max_drift is None else float(max_drift)
        self.theta_version = 0

    def after_update(self, method, snap: dict) -> list[dict]:
        """The resets of an update from `snap` (the method's state before it): the
        method's own guard events, then the drift bound."""
        e = method.engine
        resets = [{"reason": ev.get("event", "non-finite"), "action": ev.get("action")}
                  for ev in method.events[len(snap["events"]):]]
        drift = relative_drift(e.to_numpy(e.theta), e.to_numpy(e.theta0))
        if self.max_drift is not None and not drift <= self.max_drift:
            resets.append(self.restore(method, snap, "drift", drift=drift,
                                       max_drift=self.max_drift))
        if not np.array_equal(e.to_numpy(e.theta), snap["theta"]):
            self.theta_version += 1
        return resets

    def check_prediction(self, pipeline, x, logits, snap: dict, name: str):
        """(logits, resets): finite logits pass; otherwise the last good state returns
        and x is predicted again. DataError when that is not finite either."""
        e = pipeline.engine
        if np.isfinite(e.to_numpy(logits)).all():
            return logits, []
        if np.array_equal(e.to_numpy(e.theta), snap["theta"]):
            raise DataError(name, "the prediction is not finite (at the last good theta)")
        reset = self.restore(pipeline.method, snap, "non-finite prediction")
        self.theta_version += 1
        logits = pipeline.predict(x)
        if not np.isfinite(e.to_numpy(logits)).all():
            raise DataError(name, "the prediction is not finite even at the last good "
                                  "theta")
        return logits, [reset]

    def restore(self, method, snap: dict, reason: str, **info) -> dict:
        """theta, moments and step back to `snap` (a `Method.state()` taken before this
        image), or to the source when `snap` is itself beyond max_drift; the generator
        and the counters go on. Returns the reset's record."""
        e = method.engine
        state = method.state()
        back = {k: snap[k] for k in ("theta", "m", "v", "t")}
        action = "restored the last good theta, moments and step"
        if self.max_drift is not None and \
                relative_drift(back["theta"], e.to_numpy(e.theta0)) > self.max_drift:
            zeros = np.zeros_like(back["theta"])
            back = {"theta": e.to_numpy(e.theta0), "m": zeros, "v": zeros, "t": 0}
            action = "reset to the source theta (the last good one is beyond max_drift)"
        # the guard's last good state is taken again from the restored one at the next step
        method.load_state({**state, **back, "good": None})
        return {"reason": reason, **{k: finite_or_none(v) for k, v in info.items()},
                "action": action}


__all__ = ["DEFAULT_MAX_DRIFT", "Guards", "relative_drift"]
