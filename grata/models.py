"""ResUnet for optic disc/cup segmentation, in the authors' state-dict layout.

`resnet18` / `resnet34` load the authors' released checkpoints key for key; `edge` is the
same topology at a quarter of the width, small enough to adapt on a CPU.

Every BatchNorm is a `Norm2d`, whose `mode` chooses the statistics:
``running`` (stored statistics; eval; alias ``source``), ``train`` (ordinary training
BN), ``sample`` (statistics of each sample on its own: at batch 1 exactly the spec's
current-image BN, and at batch N the same as N separate passes) or ``mix`` (each sample's
statistics mixed with prior ones at weight `alpha`, see `grata.norm`).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from grata.errors import GrataError

log = logging.getLogger(__name__)

AUX_PREFIXES = ("recon", "denoise", "supres", "rotate_head.")


@dataclass(frozen=True)
class ArchSpec:
    blocks: tuple[int, int, int, int]
    widths: tuple[int, int, int, int]
    stem: int
    decoder: int
    head: int
    with_fc: bool


ARCHS: dict[str, ArchSpec] = {
    "resnet18": ArchSpec((2, 2, 2, 2), (64, 128, 256, 512), 64, 256, 32, True),
    "resnet34": ArchSpec((3, 4, 6, 3), (64, 128, 256, 512), 64, 256, 32, True),
    "edge": ArchSpec((2, 2, 2, 2), (16, 32, 64, 128), 16, 64, 16, False),
}

NORM_MODES = ("running", "train", "sample", "mix")
MODE_ALIASES = {"source": "running"}


class Norm2d(nn.BatchNorm2d):
    """BatchNorm2d with a selectable source of statistics (state dict unchanged).

    In ``mix`` mode each sample is normalised with mean (1-a) mu_p + a mu_img and
    variance (1-a) var_p + a var_img + a (1-a) (mu_img - mu_p)^2, a = `alpha`; the prior
    (mu_p, var_p) is `prior` (two [C] tensors, e.g. a stream estimate) or, when None, the
    running statistics. The image's own statistics of the last call are kept in
    `img_stats` ([N, C] mean and biased variance, detached) for a stream update."""

    mode = "running"
    alpha = 1.0
    prior: tuple[torch.Tensor, torch.Tensor] | None = None
    img_stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "sample":
            # Biased variance over H, W of each sample: BN train mode at batch 1.
            return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)
        if self.mode == "running":
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                self.bias, False, 0.0, self.eps)
        if self.mode == "mix":
            return self._mix(x)
        return super().forward(x)

    def _mix(self, x: torch.Tensor) -> torch.Tensor:
        a = float(self.alpha)
        mean_p, var_p = self.prior if self.prior is not None else (self.running_mean,
                                                                   self.running_var)
        shape = (1, -1, 1, 1)
        mean_p, var_p = mean_p.to(x.dtype).view(shape), var_p.to(x.dtype).view(shape)
        mean_i = x.mean((2, 3), keepdim=True)
        xc = x - mean_i
        var_i = (xc * xc).mean((2, 3), keepdim=True)
        self.img_stats = (mean_i.detach().flatten(1), var_i.detach().flatten(1))
        d = mean_i - mean_p
        mean = (1 - a) * mean_p + a * mean_i
        var = (1 - a) * var_p + a * var_i + a * (1 - a) * d * d
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = Norm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = Norm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            Norm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(out + skip)


class Encoder(nn.Module):
    """ResNet trunk; returns the bottleneck (before the final ReLU) and the 4 skips."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.conv1 = nn.Conv2d(3, spec.stem, 7, 2, 3, bias=False)
        self.bn1 = Norm2d(spec.stem)
        cin = spec.stem
        for i, (n, w) in enumerate(zip(spec.blocks, spec.widths)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(cin, w, stride)] + [BasicBlock(w, w, 1) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = w
        # Unused by segmentation; kept so the authors' checkpoints load key for key.
        self.fc = nn.Linear(cin, 1000) if spec.with_fc else None

    def forward(self, x):
        s0 = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(s0, 3, 2, 1)
        s1 = self.layer1(x)
        s2 = self.layer2(s1)
        s3 = self.layer3(s2)
        return self.layer4(s3), (s0, s1, s2, s3)


class UnetBlock(nn.Module):
    def __init__(self, up_in: int, skip_in: int, out: int):
        super().__init__()
        self.tr_conv = nn.ConvTranspose2d(up_in, out // 2, 2, stride=2)
        self.x_conv = nn.Conv2d(skip_in, out // 2, 1)
        self.bn = Norm2d(out)

    def forward(self, up, skip):
        return self.bn(F.relu(torch.cat([self.tr_conv(up), self.x_conv(skip)], 1)))


class ResUnet(nn.Module):
    """Encoder-decoder; forward takes [N,3,S,S] in [0,1] (S divisible by 32), returns
    logits [N,2,S,S]."""

    def __init__(self, arch: str = "resnet34", num_classes: int = 2):
        super().__init__()
        if arch not in ARCHS:
            raise GrataError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
        self.arch = arch
        spec = ARCHS[arch]
        d, w = spec.decoder, spec.widths
        self.res = Encoder(spec)
        self.up1 = UnetBlock(w[3], w[2], d)
        self.up2 = UnetBlock(d, w[1], d)
        self.up3 = UnetBlock(d, w[0], d)
        self.up4 = UnetBlock(d, spec.stem, d)
        self.up5 = nn.ConvTranspose2d(d, spec.head, 2, stride=2)
        self.bnout = Norm2d(spec.head)
        self.seg_head = nn.Conv2d(spec.head, num_classes, 1)

    def features(self, x):
        """The decoder's features before the last upsampling (up5), [N, decoder, S/2, S/2]."""
        x, (s0, s1, s2, s3) = self.res(x)
        x = F.relu(x)
        return self.up4(self.up3(self.up2(self.up1(x, s3), s2), s1), s0)

    def forward(self, x):
        return self.seg_head(F.relu(self.bnout(self.up5(self.features(x)))))


def norm_layers(model: nn.Module) -> list[tuple[str, Norm2d]]:
    """The BN layers of the segmentation path, in state-dict order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Norm2d)]


def set_norm_mode(model: nn.Module, mode: str, alpha: float = 1.0,
                  priors: list | None = None) -> None:
    """Set every BN layer's statistics: ``running`` (or ``source``), ``train``,
    ``sample`` or ``mix`` with weight `alpha` and per-layer `priors` ((mean, var) per
    layer in `norm_layers` order; None: the running statistics)."""
    mode = MODE_ALIASES.get(mode, mode)
    if mode not in NORM_MODES:
        raise ValueError(f"norm mode must be one of {NORM_MODES}, not {mode!r}")
    layers = norm_layers(model)
    if priors is not None and len(priors) != len(layers):
        raise ValueError(f"{len(priors)} priors for {len(layers)} BN layers")
    for i, (_, m) in enumerate(layers):
        m.mode = mode
        m.alpha = float(alpha)
        m.prior = None if priors is None else priors[i]


def theta_layout(model: nn.Module) -> list[dict]:
    """Flat layout of theta: for each BN layer its weight then bias (name, offset, shape)."""
    layout, offset = [], 0
    for name, m in norm_layers(model):
        for kind in ("weight", "bias"):
            n = m.num_features
            layout.append({"name": f"{name}.{kind}", "offset": offset, "shape": [n]})
            offset += n
    return layout


def bn_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The BN affine parameters in theta's order."""
    out = []
    for _, m in norm_layers(model):
        out += [m.weight, m.bias]
    return out


def flatten_theta(model: nn.Module) -> torch.Tensor:
    """Make every BN gamma/beta a view into one flat tensor and return it.

    Writing into the returned tensor changes the model at once: the update works on
    one buffer (one kernel launch on a GPU) instead of 82 small tensors.
    """
    params = bn_parameters(model)
    flat = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    offset = 0
    for _, m in norm_layers(model):
        for kind in ("weight", "bias"):
            n = m.num_features
            view = flat[offset:offset + n]
            setattr(m, kind, nn.Parameter(view, requires_grad=True))
            offset += n
    return flat


def count_parameters(model: nn.Module, segmentation_only: bool = True) -> int:
    return sum(p.numel() for n, p in model.named_parameters()
               if not (segmentation_only and n.startswith("res.fc.")))


def build(arch: str) -> ResUnet:
    return ResUnet(arch)


def _unwrap(state) -> dict:
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state_dict", "net"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise GrataError("checkpoint does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def check_finite(state: dict, source: str = "checkpoint") -> None:
    """Refuse (GrataError, one line) a state dict with a NaN or infinite value, or a
    negative BN running variance: such a model predicts NaN on every image."""
    for k, v in state.items():
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            continue
        bad = int((~torch.isfinite(v)).sum())
        if bad:
            raise GrataError(f"{source}: {k} holds {bad} NaN or infinite value(s); refused")
        if k.endswith("running_var") and bool((v < 0).any()):
            raise GrataError(f"{source}: {k} has a negative variance; refused")


def load_state(model: ResUnet, state: dict, source: str = "checkpoint") -> list[str]:
    """Load a state dict in the authors' layout; return the auxiliary keys ignored.

    Auxiliary-branch keys are reported and skipped (the reference loads non-strictly);
    any other missing, unexpected or mis-shaped key is a clear error.
    """
    state = _unwrap(state)
    aux = sorted(k for k in state if k.startswith(AUX_PREFIXES))
    state = {k: v for k, v in state.items() if not k.startswith(AUX_PREFIXES)}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise GrataError(f"{source} does not match arch {model.arch!r}: " + ", ".join(parts))
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise GrataError(f"{source} does not match arch {model.arch!r}: {k} has shape "
                             f"{tuple(v.shape)}, expected {tuple(own[k].shape)}")
    check_finite(state, source)
    model.load_state_dict(state, strict=True)
    if aux:
        log.warning("%s: ignored %d auxiliary-branch keys (%s...)", source, len(aux), aux[0])
    return aux


def load_checkpoint(path, arch: str = "resnet34") -> ResUnet:
    """Load a checkpoint (weights_only) into a ResUnet of `arch`, in eval/running mode."""
    path = Path(path)
    if not path.is_file():
        raise GrataError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file is the user's to fix
        raise GrataError(f"{path}: cannot read checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'})") from None
    model = ResUnet(arch)
    model.ignored_keys = load_state(model, state, source=str(path))
    model.eval()
    return model


def save_checkpoint(model: ResUnet, path) -> str:
    """Save the plain state dict (the authors' layout); return its SHA-256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flops(model: ResUnet, size: int) -> int:
    """Multiply-accumulates x2 of one forward pass at SxS (convs and transposed convs)."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, nn.ConvTranspose2d):
            total += 2 * inp[0].numel() * mod.out_channels * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, nn.Conv2d):
            k = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
            total += 2 * out.numel() * k

    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    return total
