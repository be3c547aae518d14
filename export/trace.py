"""Trace the three GraTa functions into FX graphs over a small set of high-level ops.

The model and the losses are traced from their own code (`grata.models`, `grata.losses`),
so the graphs follow them. BN layers (`Norm2d`), convolutions and transposed
convolutions stay whole (leaf modules); everything else is recorded as the functional
call the code makes. Shapes are recorded by running the traced graph once at the export
size (``node.meta["tensor_meta"]``).
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from grata.losses import consistency_loss, entropy_loss, teacher_batch, teacher_target
from grata.models import Norm2d

ROLES = ("infer", "entropy_grad", "consistency_grad", "infer_source")
# The same functions with mixed BN statistics (graph inputs `stats`, `alpha`).
MIX_ROLES = {"infer_mix": "infer", "entropy_grad_mix": "entropy_grad",
             "consistency_grad_mix": "consistency_grad"}


class _Infer(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        return self.model(image)


class _Entropy(_Infer):
    def forward(self, image):
        return entropy_loss(self.model(image))


class _Consistency(_Infer):
    def forward(self, image, strong_image):
        # The six teacher views as one batch (per-sample BN statistics), no gradient.
        target = teacher_target(self.model(teacher_batch(image))).detach()
        return consistency_loss(self.model(strong_image), target)


WRAPPERS = {"infer": _Infer, "entropy_grad": _Entropy, "consistency_grad": _Consistency,
            "infer_source": _Infer}
INPUTS = {"infer": ("image",), "entropy_grad": ("image",),
          "consistency_grad": ("image", "strong_image"), "infer_source": ("image",)}


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Norm2d) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module, role: str, size: int) -> fx.GraphModule:
    """FX graph of `role` for `model`, with shapes recorded at batch 1, size x size.
    The submodule prefix is ``model.``. (Which statistics the BN layers use is decided
    when lowering, not here.)"""
    wrapper = WRAPPERS[role](model)
    graph = _Tracer().trace(wrapper)
    gm = fx.GraphModule(wrapper, graph, class_name=f"Traced_{role}")
    gen = torch.Generator().manual_seed(0)
    example = [torch.rand(1, 3, size, size, generator=gen) for _ in INPUTS[role]]
    with torch.no_grad():
        ShapeProp(gm).propagate(*example)
    return gm
