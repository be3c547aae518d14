"""The model's full-resolution tail in phase layout, for export: the same function with
fewer passes over the largest tensors.

up5 is a 2x2, stride-2 transposed convolution: each input pixel writes its own 2x2 block,
so it equals a 1x1 convolution into 4x the channels (one per block position, "phase")
followed by a pixel shuffle. Everything after it until the logits is per pixel (BN with
per-channel statistics, ReLU, the 1x1 head), so it can run on the phases as they come out
of the 1x1 convolution, viewed as [N, C, 4 H, W] (each channel's four phases stacked;
its statistics are over the same pixels), and only the two-channel logits are shuffled
into place. onnxruntime's ConvTranspose and DepthToSpace are single-threaded scatters:
on the 16- or 32-channel full-resolution tensor they cost 3-4x the 1x1 convolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from grata.models import ResUnet


def phase_weights(up: nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The 1x1 convolution equal to the 2x2 stride-2 transposed convolution `up`:
    weight [4 C_out, C_in, 1, 1] with output channel c * 4 + 2 a + b = kernel position
    (a, b) of output channel c (the pixel shuffle's order), and the bias repeated."""
    w = up.weight.detach()  # [C_in, C_out, 2, 2]
    weight = w.permute(1, 2, 3, 0).reshape(4 * w.shape[1], w.shape[0], 1, 1).contiguous()
    bias = None if up.bias is None else up.bias.detach().repeat_interleave(4)
    return weight, bias


def phase_tail_applies(model: nn.Module) -> bool:
    """Whether `model` is a ResUnet whose up5 is a plain 2x2 stride-2 transposed conv."""
    up = getattr(model, "up5", None)
    return (isinstance(model, ResUnet) and type(up) is nn.ConvTranspose2d
            and tuple(up.kernel_size) == (2, 2) and tuple(up.stride) == (2, 2)
            and tuple(up.padding) == (0, 0) and tuple(up.output_padding) == (0, 0)
            and tuple(up.dilation) == (1, 1) and up.groups == 1)


class PhaseTail(nn.Module):
    """A ResUnet (sharing its modules and so its parameter names) whose up5, bnout, ReLU
    and head run in phase layout; the same logits as the model (float32 rounding aside:
    the statistics sum the same pixels in another order)."""

    features = ResUnet.features  # the encoder and decoder, unchanged

    def __init__(self, model: ResUnet, size: int):
        super().__init__()
        if not phase_tail_applies(model):
            raise ValueError("PhaseTail needs a ResUnet with a 2x2 stride-2 up5")
        for name in ("res", "up1", "up2", "up3", "up4", "bnout", "seg_head"):
            setattr(self, name, getattr(model, name))
        weight, bias = phase_weights(model.up5)
        self.up5 = nn.Conv2d(weight.shape[1], weight.shape[0], 1, bias=bias is not None)
        with torch.no_grad():
            self.up5.weight.copy_(weight)
            if bias is not None:
                self.up5.bias.copy_(bias)
        self.up5.to(model.up5.weight.dtype)
        self.half = size // 2  # the spatial size of up5's input
        self.channels = model.up5.out_channels
        self.classes = model.seg_head.out_channels

    def forward(self, x):
        h = self.half
        z = self.up5(self.features(x)).reshape(-1, self.channels, 4 * h, h)
        z = self.seg_head(F.relu(self.bnout(z)))
        return F.pixel_shuffle(z.reshape(-1, 4 * self.classes, h, h), 2)
