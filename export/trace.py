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

from grata.errors import GrataError
from grata.losses import VIEWS, consistency_loss, entropy_loss, teacher_batch, teacher_target
from grata.models import Norm2d

from grata.export.phase import PhaseTail, phase_tail_applies

ROLES = ("infer", "entropy_grad", "consistency_grad", "infer_source")
# The same functions with mixed BN statistics (graph inputs `stats`, `alpha`).
MIX_ROLES = {"infer_mix": "infer", "entropy_grad_mix": "entropy_grad",
             "consistency_grad_mix": "consistency_grad"}
# Teacher views per forward pass of the consistency graphs: a divisor of the six views.
TEACHER_VIEW_CHOICES = tuple(k for k in range(1, len(VIEWS) + 1) if len(VIEWS) % k == 0)
# The library default: one batch of six (the graph the parity tests replay against torch's
# batched teacher). Devices export view by view (`grata.export.DEVICE_TEACHER_VIEWS`).
TEACHER_VIEWS = len(VIEWS)


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
    def __init__(self, model, teacher_views: int = TEACHER_VIEWS):
        super().__init__(model)
        self.teacher_views = teacher_views

    def forward(self, image, strong_image):
        # The six teacher views, no gradient, `teacher_views` per forward pass. Each
        # sample's BN statistics are its own (or its own mixed with fixed inputs), so the
        # grouping leaves the target unchanged; it sets how many views' activations are
        # alive at once (one batch of six: about 1 GB for ResNet-34 at 512x512).
        views, k = teacher_batch(image), self.teacher_views
        if k == len(VIEWS):
            logits = self.model(views)
        else:
            logits = torch.cat([self.model(views[i:i + k])
                                for i in range(0, len(VIEWS), k)], 0)
        target = teacher_target(logits).detach()
        # + 0 x (a value of the target): the same image, but the student's forward now
        # waits for the teacher's, so onnxruntime no longer runs it first and keeps its
        # saved activations alive through the six teacher passes (-60 MiB peak at
        # ResNet-34 512x512)
        strong_image = strong_image + target.sum() * 0.0
        return consistency_loss(self.model(strong_image), target)


WRAPPERS = {"infer": _Infer, "entropy_grad": _Entropy, "consistency_grad": _Consistency,
            "infer_source": _Infer}
INPUTS = {"infer": ("image",), "entropy_grad": ("image",),
          "consistency_grad": ("image", "strong_image"), "infer_source": ("image",)}


def check_teacher_views(teacher_views) -> int:
    """`teacher_views` if it divides the six views, else a one-line `GrataError`."""
    if type(teacher_views) is not int or teacher_views not in TEACHER_VIEW_CHOICES:
        raise GrataError(f"export: teacher_views must be one of "
                         f"{', '.join(map(str, TEACHER_VIEW_CHOICES))} (got {teacher_views!r})")
    return teacher_views


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Norm2d) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module, role: str, size: int,
          teacher_views: int = TEACHER_VIEWS) -> fx.GraphModule:
    """FX graph of `role` for `model`, with shapes recorded at batch 1, size x size.
    The submodule prefix is ``model.``; a ResUnet's full-resolution tail is traced in
    phase layout (`grata.export.phase`), the same function. (Which statistics the BN layers use is decided
    when lowering, not here.) `teacher_views` (1, 2, 3 or 6): the consistency graph's
    teacher views per forward pass."""
    check_teacher_views(teacher_views)
    if phase_tail_applies(model):
        model = PhaseTail(model, size)
    wrapper = (_Consistency(model, teacher_views) if role == "consistency_grad"
               else WRAPPERS[role](model))
    graph = _Tracer().trace(wrapper)
    gm = fx.GraphModule(wrapper, graph, class_name=f"Traced_{role}")
    gen = torch.Generator().manual_seed(0)
    example = [torch.rand(1, 3, size, size, generator=gen) for _ in INPUTS[role]]
    with torch.no_grad():
        ShapeProp(gm).propagate(*example)
    return gm
