"""Source training with the authors' recipe, scaled to a CPU, resumable per epoch.

SGD (Nesterov, momentum 0.99, weight decay 5e-4), poly decay (1 - e/E)^0.9,
Dice + BCE on the sigmoid outputs, light spatial and intensity augmentation.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from grata.domains import Sample, stream_domain
from grata.disc_scale import DiscScale, measure_disc_scale, write_sidecar
from grata.errors import GrataError
from grata.models import ResUnet, load_state, save_checkpoint, set_norm_mode

log = logging.getLogger(__name__)


def load_split(root, domain: str, size: int) -> tuple[np.ndarray, np.ndarray, list]:
    """The usable images and targets of a domain's train split, stacked; plus skips."""
    images, targets, skipped = [], [], []
    for item in stream_domain(root, domain, size, splits=("train",)):
        if isinstance(item, Sample):
            images.append(item.image)
            targets.append(item.target)
        else:
            skipped.append(item)
    if not images:
        raise GrataError(f"domain {domain!r} in {root} has no usable images")
    return np.stack(images), np.stack(targets), skipped


def store_disc_scale(targets: np.ndarray, out, domain: str, size: int) -> DiscScale:
    """Measure the disc's scale on the training targets (as loaded, S x S) and keep it
    beside the checkpoint `out` (`grata.disc_scale`)."""
    scale = measure_disc_scale(targets)
    write_sidecar(out, scale, {"domain": domain, "split": "train", "size": int(size)})
    return scale


def measure_source_scale(data_root, domain: str, size: int, out) -> DiscScale:
    """The disc's scale of a domain's train split, written beside the checkpoint `out`
    without training (for a checkpoint trained on that split before it was measured)."""
    _, targets, _ = load_split(data_root, domain, size)
    return store_disc_scale(targets, out, domain, size)


def augment_batch(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
    """Light augmentation: flips, small scale/shift, brightness/contrast/gamma jitter."""
    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    y = torch.where(flip[:, None, None, None], y.flip(3), y)
    scale = 1 + (torch.rand(n, generator=gen) - 0.5) * 0.3
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.2
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    y = (F.grid_sample(y, grid, mode="nearest", padding_mode="zeros", align_corners=False) > 0.5
         ).float()
    gain = 1 + (torch.rand(n, 3, 1, 1, generator=gen) - 0.5) * 0.3
    gamma = torch.exp((torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.4)
    x = (x.clamp(0, 1) ** gamma * gain)
    lo = x.amin((1, 2, 3), keepdim=True)
    hi = x.amax((1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-6), y


def seg_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice (per channel, over the batch)."""
    p = torch.sigmoid(logits)
    inter = (p * y).sum((0, 2, 3))
    dice = (2 * inter + 1) / (p.sum((0, 2, 3)) + y.sum((0, 2, 3)) + 1)
    return F.binary_cross_entropy_with_logits(logits, y) + (1 - dice).mean()


def train_source(data_root, domain: str, arch: str, size: int, epochs: int, out,
                 batch: int = 8, lr: float = 1e-3, seed: int = 0, resume: bool = True,
                 progress: bool = True, threads: int | None = None) -> dict:
    """Train a ResUnet on a domain's train split; write `out` (plain state dict) and the
    training discs' scale beside it (`<out>.scale.json`, `grata.disc_scale`).

    A `<out>.state.pt` file holds the model, optimiser and generator after each epoch,
    so an interrupted run continues where it stopped.
    """
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GrataError(f"{out.parent}: cannot create the output folder ({exc.strerror})") \
            from None
    state_path = out.with_name(out.name + ".state.pt")
    images, targets, skipped = load_split(data_root, domain, size)
    for s in skipped:
        log.warning("skipped %s: %s", s.name, s.reason)
    measure_disc_scale(targets)  # masks without any disc: say so before the epochs
    torch.manual_seed(seed)
    model = ResUnet(arch)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.99, nesterov=True,
                          weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    start = 0
    history: list[float] = []
    if resume and state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        if st["config"] != [domain, arch, size, epochs, batch, lr, seed]:
            raise GrataError(f"{state_path}: resume state is for another configuration "
                             f"({st['config']}); delete it or pass --no-resume")
        load_state(model, st["model"], source=str(state_path))
        opt.load_state_dict(st["optim"])
        gen.set_state(st["gen"])
        start, history = int(st["epoch"]), list(st["history"])
    x_all = torch.from_numpy(images)
    y_all = torch.from_numpy(targets)
    set_norm_mode(model, "train")
    model.train()
    bar = range(start, epochs)
    if progress:
        bar = tqdm(bar, initial=start, total=epochs, desc="train", unit="epoch")
    for epoch in bar:
        for g in opt.param_groups:
            g["lr"] = lr * (1 - epoch / epochs) ** 0.9
        order = torch.randperm(len(x_all), generator=gen)
        total = 0.0
        for i in range(0, len(order) - batch + 1, batch):  # drop the ragged last batch
            idx = order[i:i + batch]
            x, y = augment_batch(x_all[idx], y_all[idx], gen)
            loss = seg_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        history.append(total / max(1, (len(order) // batch) * batch))
        if progress:
            bar.set_postfix(loss=f"{history[-1]:.4f}")
        tmp = state_path.with_name(state_path.name + ".tmp")
        torch.save({"config": [domain, arch, size, epochs, batch, lr, seed],
                    "model": model.state_dict(), "optim": opt.state_dict(),
                    "gen": gen.get_state(), "epoch": epoch + 1, "history": history}, tmp)
        tmp.replace(state_path)
    model.eval()
    set_norm_mode(model, "running")
    digest = save_checkpoint(model, out)
    scale = store_disc_scale(targets, out, domain, size)
    state_path.unlink(missing_ok=True)
    return {"checkpoint": str(out), "sha256": digest, "epochs": epochs,
            "final_loss": history[-1] if history else None, "n_images": len(images),
            "disc_scale": scale}
