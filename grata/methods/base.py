"""The shared shape of a test-time method: one step on an image, then its prediction."""

from __future__ import annotations

import numpy as np

from ..augment import strong_augment
from ..norm import NormSpec, ema_update


class Method:
    """A method over an engine (`TorchEngine` or `grata.runtime.OrtEngine`).

    Subclasses implement `step(x, strong)`; `adapt` adds the numerics guard: a
    non-finite loss or gradient skips the update and returns theta to the last good
    value (recorded in `events`).
    """

    name = "base"
    norm = NormSpec("sample")  # BN statistics of every pass (`grata.norm`)
    fixed_norm = False       # True: the method ignores a norm choice (source)
    needs_strong = False     # whether step() consumes a strong view
    updates = False          # whether theta changes

    def __init__(self, engine, seed: int = 0, norm="sample", **hyperparameters):
        if hyperparameters:
            raise TypeError(f"{self.name}: unknown hyperparameters "
                            f"{', '.join(sorted(hyperparameters))}")
        if not self.fixed_norm:
            self.norm = NormSpec(norm)
        self.engine = engine
        self.seed = seed
        self.events: list[dict] = []
        self.last = {}
        self.reset()

    def reset(self) -> None:
        """Back to the source theta, fresh optimiser state and augmentation stream."""
        e = self.engine
        e.assign(e.theta, e.theta0)
        if getattr(e, "stats", None) is not None:  # the stream statistics (ema)
            e.assign(e.stats, e.stats0)
        self.m, self.v, self.t = e.zeros(), e.zeros(), 0
        self.good = None
        self.rng = np.random.default_rng(self.seed)
        self.n_seen = 0

    def draw_strong(self, image: np.ndarray):
        """The strong style view of a [3,S,S] numpy image, from this method's generator."""
        return self.engine.to_input(strong_augment(image, self.rng))

    def adapt(self, x, strong=None, image: np.ndarray | None = None):
        """One adaptation step on image x ([1,3,S,S]), then the prediction's logits.

        `strong` supplies the strong view instead of drawing one; `image` (the same
        image as a host [3,S,S] array) spares a device-to-host copy when drawing it.
        """
        self.n_seen += 1
        if self.updates:
            e = self.engine
            if self.needs_strong and strong is None:
                host = image if image is not None else e.to_numpy(x).reshape(x.shape[-3:])
                strong = self.draw_strong(host)
            if self.good is None:
                self.good = (e.copy(e.theta), e.copy(self.m), e.copy(self.v), self.t)
            self.step(x, strong)
            # One check after the update (one device sync on a GPU): a non-finite loss or
            # gradient shows up in theta or the moments, and the last good state returns.
            if e.all_finite(e.theta, self.m, self.v, *self.last.values()):
                for dst, src in zip((self.good[0], self.good[1], self.good[2]),
                                    (e.theta, self.m, self.v)):
                    e.assign(dst, src)
                self.good = (*self.good[:3], self.t)
            else:
                for dst, src in zip((e.theta, self.m, self.v), self.good[:3]):
                    e.assign(dst, src)
                self.t = self.good[3]
                self.events.append({"image": self.n_seen, "event": "non-finite",
                                    "action": "restored last good theta and moments"})
        logits = self.engine.infer(x, norm=self.norm)
        if self.norm.kind == "ema":
            self.update_stream()
        return logits

    @property
    def norm_kw(self) -> dict:
        """The `norm` keyword for the engine's gradient calls: none for the paper's
        setting, so engines written before the choice existed keep working."""
        return {} if self.norm == "sample" else {"norm": self.norm}

    def update_stream(self) -> None:
        """ema: move the stream statistics to the mixture with the predicted image's own
        (non-finite image statistics leave them unchanged, recorded in `events`)."""
        e = self.engine
        if e.all_finite(e.img_stats):
            ema_update(e.stats, e.img_stats, self.norm.momentum, e.layout)
        else:
            self.events.append({"image": self.n_seen, "event": "non-finite statistics",
                                "action": "kept the stream statistics"})

    def step(self, x, strong) -> None:
        """Update theta (and the moments) from x. Losses go to `self.last`, unsynced."""
        raise NotImplementedError
