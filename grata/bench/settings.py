"""Names and fixed settings of `grata bench`: stages, backends, malloc, FLOP convention."""

from __future__ import annotations

STAGES = ("predict", "entropy_grad", "consistency_grad", "augment", "update", "grata")
# Asked for by name only (--stages grata,scale): streams of crops at other scales located
# with the source model, then the full step (`grata.bench.scale_stream`)
SCALE_STAGE = "scale"
STAGE_CHOICES = STAGES + (SCALE_STAGE,)
STAGE_BACKENDS = ("onnx-cpu", "onnx-cuda", "onnx-tensorrt", "torch-cpu", "torch-cuda")
ADAPT_BACKENDS = ("onnx", "torch-ref", "torch")
# glibc malloc settings given to every worker (--malloc). "large": buffers up to 32 MiB
# (glibc's maximum threshold) come from the heap and are reused, as in glibc's own steady
# state once its dynamic threshold has grown, but from the first call on, so no run
# depends on allocation history. "small": every buffer above 128 KiB is its own mapping,
# returned at free: RSS follows live memory closely, and each call pays page faults for
# its big buffers again (measured: +2 s per image for the torch reference at 512).
MALLOC_SETTINGS = {
    "large": {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "67108864"},
    "small": {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"},
    "system": {},
}
MALLOC_KEYS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
RESULT_TAG = "GRATA_BENCH_RESULT "
FORMAT_VERSION = 1
# FLOPs of one GraTa image in units of one forward pass: 9 forwards (entropy, 6 teacher
# views, student, final) + 2 backwards counted at 2 forwards each (the usual convention:
# input and weight gradients). The weights are frozen here, so the backwards compute
# input gradients only (~1 forward each): the work actually done is nearer 11 forwards,
# and rates from this count are an upper bound.
FORWARDS_PER_IMAGE = 9 + 2 * 2
