"""The shared shape of a test-time method: one step on an image, then its prediction."""

from __future__ import annotations

import numpy as np

from ..augment import strong_augment


class Method:
    """A method over an engine (`TorchEngine` or `grata.runtime.OrtEngine`).

    Subclasses implement `step(x, strong)`; `adapt` adds the numerics guard: a
    non-finite loss or gradient skips the update and returns theta to the last good
    value (recorded in `events`).
    """

    name = "base"
    norm = "sample"          # statistics used for the prediction
    needs_strong = False     # whether step() consumes a strong view
    updates = False          # whether theta changes

    def __init__(self, engine, seed: int = 0, **hyperparameters):
        if hyperparameters:
            raise TypeError(f"{self.name}: unknown hyperparameters "
                            f"{', '.join(sorted(hyperparameters))}")
        self.engine = engine
        self.seed = seed
        self.events: list[dict] = []
        self.last = {}
        self.reset()

    def reset(self) -> None:
        """Back to the source theta, fresh optimiser state and augmentation stream."""
        e = self.engine
        e.assign(e.theta, e.theta0)
        self.m, self.v, self.t = e.zeros(), e.zeros(), 0
        self.good = e.copy(e.theta)
        self.rng = np.random.default_rng(self.seed)
        self.n_seen = 0

    def strong_view(self, x):
        """Draw the strong style view of x from this method's seeded generator."""
        img = self.engine.to_numpy(x)
        return self.engine.to_input(strong_augment(img.reshape(img.shape[-3:]), self.rng))

    def adapt(self, x, strong=None):
        """One adaptation step on image x ([1,3,S,S]), then the prediction's logits."""
        self.n_seen += 1
        if self.updates:
            if self.needs_strong and strong is None:
                strong = self.strong_view(x)
            ok = self.step(x, strong)
            e = self.engine
            if ok and e.all_finite(e.theta):
                self.good = e.copy(e.theta)
            else:
                e.assign(e.theta, self.good)
                self.events.append({"image": self.n_seen, "event": "non-finite",
                                    "action": "restored last good theta"})
        return self.engine.infer(x, norm=self.norm)

    def step(self, x, strong) -> bool:
        """Update theta from x; return False when a loss or gradient was not finite."""
        raise NotImplementedError
