"""GraTa's strong style augmentation, in numpy so every backend draws the same view.

One call draws everything from the given `numpy.random.Generator`, so a seeded stream
is reproducible and the torch and onnx backends see identical student images.
"""

from __future__ import annotations

import numpy as np


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def _low_or_high(rng: np.random.Generator, low: tuple, high: tuple) -> float:
    # Half the time below 1, half above: a symmetric-looking spread of factors.
    return rng.uniform(*low) if rng.uniform() < 0.5 else rng.uniform(*high)


def _gauss_kernel(sigma: float) -> np.ndarray:
    radius = int(4.0 * sigma + 0.5)  # the usual truncation at 4 sigma
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(channel: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of one [H,W] channel, mirror ('reflect') borders."""
    k = _gauss_kernel(sigma)
    r = len(k) // 2
    out = channel.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="symmetric")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for i, w in enumerate(k):
            acc += w * (p[i:i + n] if axis == 0 else p[:, i:i + n])
        out = acc
    return out.astype(channel.dtype)


def brightness(x: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Each channel of [C,H,W] multiplied by its factor."""
    return x * np.asarray(factors, x.dtype).reshape(-1, 1, 1)


def contrast(channel: np.ndarray, factor: float) -> np.ndarray:
    """One channel scaled around its mean, clipped to its previous min/max."""
    lo, hi, mean = channel.min(), channel.max(), channel.mean()
    return np.clip((channel - mean) * factor + mean, lo, hi)


def gamma(channel: np.ndarray, g: float) -> np.ndarray:
    """Gamma on the inverted channel: rescale to [0,1], power g, restore range, invert back."""
    inv = -channel
    lo, span = inv.min(), inv.max() - inv.min()
    return -(np.power((inv - lo) / (span + 1e-7), g) * span + lo)


def strong_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Strong style view of a [3,H,W] image in [0,1]; returns a new float32 array in [0,1]."""
    x = np.array(image, dtype=np.float32, copy=True)
    c = x.shape[0]
    if rng.uniform() < 0.75:  # brightness
        x = brightness(x, rng.uniform(0.5, 1.5, size=(c, 1, 1)).astype(np.float32))
    if rng.uniform() < 0.75:  # contrast, clipped to each channel's previous range
        for i in range(c):
            x[i] = contrast(x[i], _low_or_high(rng, (0.5, 1.0), (1.0, 1.5)))
    if rng.uniform() < 0.75:  # gamma on the inverted image
        for i in range(c):
            x[i] = gamma(x[i], _low_or_high(rng, (0.5, 1.0), (1.0, 2.0)))
    if rng.uniform() < 0.5:  # Gaussian noise; the spec draws the variance
        var = rng.uniform(0.0, 0.05)
        x += rng.normal(0.0, np.sqrt(var), size=x.shape).astype(np.float32)
    if rng.uniform() < 0.5:  # Gaussian blur, per channel
        for i in range(c):
            sigma = rng.uniform(0.5, 1.5)
            if rng.uniform() < 0.5:
                x[i] = gaussian_blur(x[i], sigma)
    return _minmax(x).astype(np.float32)
