"""The shared shape of a test-time method: one step on an image, then its prediction."""

from __future__ import annotations

import copy

import numpy as np

from grata.augment import strong_augment
from grata.norm import NormSpec, ema_update


class Method:
    """A method over an engine (`grata.engine_protocol.Engine`: TorchEngine, OrtEngine,
    CudaEngine).

    Subclasses implement `step(x, strong)`; `adapt` adds the numerics guard: a
    non-finite loss or gradient skips the update and returns theta to the last good
    value (recorded in `events`). `state()` / `load_state()` are the only way in or out
    of the adapted state (theta, moments, step, guard, generator, counters).
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
        self._stream_prev = None  # the estimate update_stream moved, not yet checked

    @property
    def steps(self) -> int:
        """Update steps taken since the last reset (Adam's t)."""
        return self.t

    @property
    def images_seen(self) -> int:
        """Images adapted on since the last reset."""
        return self.n_seen

    # -- state -------------------------------------------------------------------------
    def state(self) -> dict:
        """A host copy of everything that decides how the stream continues: theta, the
        moments m and v, the step t, the guard's last good state, the generator state,
        the counters (n_seen, events). `load_state` of it continues bit for bit."""
        e = self.engine
        self._settle_stream()  # a saved estimate has been checked

        def host(a):
            return np.array(e.to_numpy(a), dtype=np.float32, copy=True)

        good = None
        if self.good is not None:
            good = {"theta": host(self.good[0]), "m": host(self.good[1]),
                    "v": host(self.good[2]), "t": int(self.good[3])}
        return {"method": self.name, "seed": self.seed, "theta": host(e.theta),
                "m": host(self.m), "v": host(self.v), "t": int(self.t), "good": good,
                "rng": copy.deepcopy(self.rng.bit_generator.state),
                "n_seen": int(self.n_seen), "events": copy.deepcopy(self.events),
                "stats": None if getattr(e, "stats", None) is None else host(e.norm_state())}

    def load_state(self, state: dict) -> None:
        """Restore a `state()` (theta and moments of the same length as this engine's)."""
        e = self.engine
        self._stream_prev = None
        e.assign(e.theta, state["theta"])
        e.assign(self.m, state["m"])
        e.assign(self.v, state["v"])
        self.t = int(state["t"])
        good = state.get("good")
        if good is None:
            self.good = None
        else:
            self.good = (e.copy(e.theta), e.zeros(), e.zeros(), int(good["t"]))
            for dst, key in zip(self.good[:3], ("theta", "m", "v")):
                e.assign(dst, good[key])
        self.rng.bit_generator.state = copy.deepcopy(state["rng"])
        self.n_seen = int(state["n_seen"])
        self.events = copy.deepcopy(list(state.get("events", [])))
        if state.get("stats") is not None and getattr(e, "stats", None) is not None:
            e.load_norm_state(state["stats"])

    # -- one image ---------------------------------------------------------------------
    def draw_strong(self, image: np.ndarray):
        """The strong style view of a [3,S,S] numpy image, from this method's generator."""
        return self.engine.to_input(strong_augment(image, self.rng))

    def adapt(self, x, strong=None, image: np.ndarray | None = None):
        """One adaptation step on image x ([1,3,S,S]), then the prediction's logits.

        `strong` supplies the strong view instead of drawing one; `image` (the same
        image as a host [3,S,S] array) spares a device-to-host copy when drawing it.
        """
        self.update(x, strong, image)
        logits = self.engine.infer(x, norm=self.norm)
        if self.norm.kind == "ema":
            self.update_stream()
        return logits

    def update(self, x, strong=None, image: np.ndarray | None = None) -> None:
        """The adaptation step of `adapt` without the prediction (a server that predicts
        elsewhere calls this)."""
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
            # It also covers the stream statistics the last image moved (`update_stream`).
            stats = (e.stats,) if self._stream_prev is not None else ()
            if e.all_finite(e.theta, self.m, self.v, *self.last.values(), *stats):
                self._stream_prev = None
                for dst, src in zip((self.good[0], self.good[1], self.good[2]),
                                    (e.theta, self.m, self.v)):
                    e.assign(dst, src)
                self.good = (*self.good[:3], self.t)
                return
            for dst, src in zip((e.theta, self.m, self.v), self.good[:3]):
                e.assign(dst, src)
            self.t = self.good[3]
            if stats and not self._settle_stream():
                # the step ran on a broken estimate: again on the restored one, as if the
                # statistics had been checked when they moved (a rare path: more syncs)
                self.n_seen -= 1
                return self.update(x, strong, image)
            self.events.append({"image": self.n_seen, "event": "non-finite",
                                "action": "restored last good theta and moments"})

    @property
    def norm_kw(self) -> dict:
        """The `norm` keyword for the engine's gradient calls: none for the paper's
        setting, so engines written before the choice existed keep working."""
        return {} if self.norm == "sample" else {"norm": self.norm}

    def update_stream(self) -> None:
        """ema: move the stream statistics to the mixture with the predicted image's own
        (non-finite image statistics leave them unchanged, recorded in `events`).

        A method that updates checks the moved estimate in its next update's one sync
        (a GPU syncs once per image, not twice); the others check it here."""
        e = self.engine
        prev = e.copy(e.stats)
        ema_update(e.stats, e.img_stats, self.norm.momentum, e.layout)
        self._stream_prev = (prev, self.n_seen)
        if not self.updates:
            self._settle_stream()

    def _settle_stream(self) -> bool:
        """Check the estimate `update_stream` moved last (one sync): True when finite,
        else it returns to the one before, recorded in `events`."""
        if self._stream_prev is None:
            return True
        e = self.engine
        (prev, image), self._stream_prev = self._stream_prev, None
        if e.all_finite(e.stats):
            return True
        e.assign(e.stats, prev)
        self.events.append({"image": image, "event": "non-finite statistics",
                            "action": "kept the stream statistics"})
        return False

    def step(self, x, strong) -> None:
        """Update theta (and the moments) from x. Losses go to `self.last`, unsynced."""
        raise NotImplementedError
