"""Export of the GraTa graphs to ONNX, and the artifact folder the device runtime reads.

`export_artifacts` needs torch (imported when called); `load_manifest` does not, so the
runtime can import this package without torch. (onnxruntime's session settings live with
the runtime: `grata.runtime.ort_session`.)
"""

from __future__ import annotations

from grata.export.manifest import FORMAT_VERSION, load_manifest

# What the commands (grata export, the artifact cache, grata bench) export for a device:
# the teacher view by view, the same target as one batch (tests/test_teacher_views.py)
# with a sixth of its activations alive. export_artifacts' own default stays one batch of
# six, the graph the parity tests replay against torch's batched teacher.
DEVICE_TEACHER_VIEWS = 1
# What the exporter writes for the same model and options, in the artifact cache's keys
# so folders of an earlier exporter are not reused (2: the convolution backward's
# flipped kernels stored in the weights file instead of folded by each session; 3: BN's
# backward recomputes xhat where its input is a ReLU output kept for the mask anyway;
# 4: the full-resolution tail in phase layout, grata.export.phase; 5: per-channel affine
# maps as one BatchNormalization; 6: its epsilon the ONNX default, which cuDNN accepts).
EXPORT_REVISION = 6

__all__ = ["DEVICE_TEACHER_VIEWS", "EXPORT_REVISION", "FORMAT_VERSION", "export_artifacts",
           "load_manifest"]


def export_artifacts(model_or_checkpoint, arch: str, size: int, out_dir,
                     opset: int = 17, teacher_views: int = 6, disc_scale=None) -> dict:
    """Export `model_or_checkpoint` (a `ResUnet` or a checkpoint path) of `arch` at
    `size` x `size` (batch 1) to the artifact folder `out_dir`; return the manifest.

    Graphs (BN with the statistics of the current image, theta = every BN gamma/beta as
    one flat float32 vector in `grata.models.theta_layout` order):
    ``infer`` (image, theta) -> logits; ``entropy_grad`` (image, theta) -> (loss, grad);
    ``consistency_grad`` (image, strong_image, theta) -> (loss, grad), the six teacher
    views without gradient, `teacher_views` per forward pass (6: one batch; 1: view by
    view, the same target with a sixth of the teacher's activations alive); and ``infer_source`` (image, theta) -> logits
    with the stored BN statistics (the source-only baseline); and ``infer_mix``,
    ``entropy_grad_mix``, ``consistency_grad_mix``: the same three with the image's BN
    statistics mixed with the inputs ``stats`` (flat, theta's layout) at weight ``alpha``
    (`infer_mix` also returns ``img_stats``). `size` is a multiple of 32, at least 64;
    `opset` 17..21. The folder is written beside `out_dir` and swapped in atomically; an
    existing `out_dir` is replaced only if it is an artifact folder an export wrote
    (verified manifest, nothing else in it), anything else is refused. `disc_scale`
    (a `grata.disc_scale.DiscScale`: the disc's scale in the training crops) goes into
    the manifest as ``disc_scale`` when given. The folder layout and manifest are
    described in this package's README.
    """
    from grata.export.exporter import export_artifacts as _export

    return _export(model_or_checkpoint, arch, size, out_dir, opset=opset,
                   teacher_views=teacher_views, disc_scale=disc_scale)
