"""Post-training quantisation of the `infer` graph, and FP16 copies of the graphs.

INT8 (explicit quantisation): onnxruntime's static quantiser in QDQ format, standard
ONNX domain only (QuantizeLinear / DequantizeLinear, no com.microsoft ops), so the
result runs on onnxruntime's CPU provider and TensorRT builds INT8 engines from it.

- Only Conv and ConvTranspose are quantised: their input activation (int8, symmetric,
  zero point 0, as TensorRT requires) and their weights (int8, symmetric, per output
  channel by default: axis 0 for Conv, axis 1 for ConvTranspose); biases become int32.
  Everything else stays float32, in particular the normalisation: theta is a graph
  input and the InstanceNormalization scale/bias sliced from it are never quantised,
  so an adapted theta far from theta0 is used exactly (a range calibrated at theta0
  would clip it).
- Calibration feeds each image of a folder (read as the runtime reads images: resize,
  min-max to [0, 1]) with theta = theta0. Calibrators: ``entropy`` (KL divergence on
  histograms), ``percentile`` (99.999 % of |x| by default) and ``minmax``.
- The quantised artifact folder is a complete artifact folder: ``infer`` is the QDQ
  graph (weights embedded), the gradient graphs and ``infer_source`` are the float32
  originals with the shared ``weights.bin``; its manifest records the quantisation. So
  adaptation (both gradients) runs in float32 and only the prediction is INT8.

FP16: `convert_fp16` converts every graph to float16 inside, float32 at the inputs and
outputs (the runtime feeds it unchanged), with the frozen weights shared across graphs
in one ``weights.bin`` as the float32 export does. Every node that reads an adapted input
(theta; the statistics and weight of the mixed graphs) stays float32 (`adapted_nodes`):
the slices that cut gamma and beta out of theta, the arithmetic of their scale and shift,
and the normalisation or element-wise node where they meet the activations. In float16 a
gamma of about 1 has a spacing of about 1e-3, so Adam steps of 1e-5 would vanish. For GPUs
(CUDA / TensorRT providers); onnxruntime's CPU provider runs it, slowly.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from grata.errors import GrataError
from grata.export.manifest import load_manifest, write_manifest
from importlib import metadata
from grata.decode import IMAGE_SUFFIXES, load_image
from grata.errors import DataError

log = logging.getLogger(__name__)

CALIBRATORS = ("entropy", "percentile", "minmax")
QUANTIZED_OPS = ("Conv", "ConvTranspose")
INT8_GRAPH = "infer_int8.onnx"
# Ops kept in float32 inside the FP16 gradient graphs: the long sums of the BN statistics
# and of their backward lose too much in float16 (measured: ~3 % error on the gradient).
FP16_KEEP_FLOAT32 = ("ReduceSum", "ReduceMean", "ReduceSumSquare")
# graph inputs that adaptation changes between images (kept float32 wherever read)
ADAPTED_INPUTS = ("theta", "stats", "alpha")


def list_images(folder, limit: int | None = None) -> list[Path]:
    """Image files under `folder` (recursive, sorted); at most `limit`, evenly spread."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GrataError(f"{folder}: image folder not found")
    paths = sorted(p for p in folder.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise GrataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    if limit is not None and 0 < limit < len(paths):
        idx = np.linspace(0, len(paths) - 1, limit).round().astype(int)
        paths = [paths[i] for i in idx]
    return paths


def _reader_base():
    from onnxruntime.quantization import CalibrationDataReader
    return CalibrationDataReader


class ImageReader:
    """Calibration feeds: {'image': [1,3,S,S], 'theta': theta} per readable image, in
    chunks of `chunk` images (get_next returns None at the end of each chunk; `more()`
    says whether another follows), so the calibrator never holds more than one chunk of
    activations. Unreadable files are skipped and listed in `skipped`. Built through
    `image_reader` (onnxruntime's CalibrationDataReader is its base class)."""

    def __init__(self, paths, size: int, theta: np.ndarray, chunk: int = 8):
        self.paths, self.size, self.chunk = list(paths), int(size), max(1, int(chunk))
        self.theta = np.ascontiguousarray(theta, dtype=np.float32)
        self.skipped: list[tuple[str, str]] = []
        self.used = 0
        self.rewind()

    def rewind(self) -> None:
        self._next = 0
        self._buffer: list[np.ndarray] = []

    def more(self) -> bool:
        """Read the next chunk of images; False when no readable image is left."""
        self._buffer = []
        while self._next < len(self.paths) and len(self._buffer) < self.chunk:
            path = self.paths[self._next]
            self._next += 1
            try:
                self._buffer.append(load_image(path, self.size))
            except DataError as exc:
                self.skipped.append((str(path), exc.problem))
        self.used += len(self._buffer)
        return bool(self._buffer)

    def get_next(self):
        if not self._buffer:
            return None
        return {"image": self._buffer.pop(0)[None].astype(np.float32), "theta": self.theta}


def image_reader(paths, size: int, theta: np.ndarray, chunk: int = 8):
    """An `ImageReader` that is also an onnxruntime CalibrationDataReader."""
    cls = type("ImageCalibrationReader", (ImageReader, _reader_base()), {})
    return cls(paths, size, theta, chunk)


def _calibration_method(name: str):
    from onnxruntime.quantization import CalibrationMethod
    table = {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile,
             "minmax": CalibrationMethod.MinMax}
    if name not in table:
        raise GrataError(f"unknown calibration method {name!r}; choose from "
                         f"{', '.join(CALIBRATORS)}")
    return table[name]


def _calibrate(model_path: Path, reader, method: str, percentile: float, bins: int,
               work: Path):
    """Activation ranges of the inputs of the quantised ops over the reader's images.

    onnxruntime's calibrators are driven here rather than through quantize_static, for
    two reasons: quantize_static builds the entropy calibrator with 128 histogram bins
    and 128 quantised bins, where the KL search has a single candidate (the maximum:
    entropy would silently be min-max), and its histogram calibrators keep every
    image's activations until the end (chunks of images bound the memory here)."""
    from onnxruntime.quantization import create_calibrator
    options = {"symmetric": True}
    if method == "entropy":  # the KL search tries every threshold from 128 to `bins` bins
        options.update(num_bins=int(bins), num_quantized_bins=128)
    elif method == "percentile":
        options.update(num_bins=int(bins), percentile=float(percentile))
    calibrator = create_calibrator(model_path, list(QUANTIZED_OPS),
                                   augmented_model_path=str(work / "augmented.onnx"),
                                   calibrate_method=_calibration_method(method),
                                   extra_options=options)
    while reader.more():
        calibrator.collect_data(reader)
    if reader.used == 0:
        return None
    return calibrator.compute_data()


def _staging(out_dir: Path) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp"))


def _publish(tmp: Path, out_dir: Path) -> None:
    """Replace out_dir by the finished folder tmp (never a half-written folder)."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)


def _manifest_fields(manifest: dict) -> dict:
    fields = {k: v for k, v in manifest.items()
              if k not in ("format_version", "sha256", "manifest_sha256")}
    fields["graphs"] = dict(manifest["graphs"])
    return fields


def graph_bytes(path) -> int:
    """Bytes a graph needs on disk: its file plus the external data it references."""
    import onnx
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    total = path.stat().st_size
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            total += int(info.get("length", 0))
    return total


def quantize_artifacts(artifacts, images, out_dir, method: str = "percentile",
                       per_channel: bool = True, max_images: int | None = None,
                       percentile: float = 99.999, bins: int = 2048) -> dict:
    """Quantise the `infer` graph of `artifacts` to INT8 (QDQ) with calibration images.

    `images` is a folder of unlabeled source-domain images or a list of paths; `bins`
    is the histogram size of the entropy and percentile calibrators (TensorRT's entropy
    calibrator uses 2048; the search time grows with it). Writes a
    complete artifact folder `out_dir` (replaced if present; see the module docstring)
    and returns its manifest, whose ``quantization`` field records the settings.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static, save_tensors_data
    from onnxruntime.quantization.shape_inference import quant_pre_process

    _calibration_method(method)  # an unknown name fails before any work
    if method == "entropy" and bins < 256:
        raise GrataError(f"bins={bins}: the entropy calibrator needs at least 256")
    src = Path(artifacts)
    out_dir = Path(out_dir)
    if out_dir.resolve() == src.resolve():
        raise GrataError("--out must differ from --artifacts")
    manifest = load_manifest(src)
    if manifest.get("precision", {}).get("infer", "fp32") != "fp32":
        raise GrataError(f"artifact {src}: the infer graph is already "
                         f"{manifest['precision']['infer']}; quantise float32 artifacts")
    paths = list_images(images, max_images) if not isinstance(images, (list, tuple)) \
        else [Path(p) for p in images]
    theta0 = np.load(src / manifest["theta0"]).astype(np.float32)
    reader = image_reader(paths, manifest["size"], theta0)

    tmp = _staging(out_dir)
    try:
        # The quantiser's tools write temporary copies, which cannot follow a relative
        # external-data reference: embed the weights first, then pre-process (shape
        # inference and onnxruntime's basic, standard-domain graph clean-up).
        work = Path(tempfile.mkdtemp(dir=tmp, prefix=".work"))
        onnx.save(onnx.load(str(src / manifest["graphs"]["infer"])), str(work / "fp32.onnx"))
        quant_pre_process(str(work / "fp32.onnx"), str(work / "pre.onnx"))
        ranges = _calibrate(work / "pre.onnx", reader, method, percentile, bins, work)
        if ranges is None:
            raise GrataError(f"none of the {len(paths)} calibration images could be read "
                             f"(first: {reader.skipped[0][0]}: {reader.skipped[0][1]})")
        save_tensors_data(ranges, work / "ranges.json")
        # reduce_range: 7-bit weights. x86 CPUs without VNNI (AVX2, AVX-512 before VNNI)
        # multiply int8 pairs into saturating int16 sums; full-range weights overflow
        # there (measured on an AVX2 EPYC: the INT8 logits' correlation with fp32 fell
        # from above 0.9 to 0.55). TensorRT and VNNI CPUs lose one bit of weight range.
        quantize_static(
            str(work / "pre.onnx"), str(tmp / INT8_GRAPH), None,
            calibration_cache_path=str(work / "ranges.json"),
            quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8, calibrate_method=_calibration_method(method),
            op_types_to_quantize=list(QUANTIZED_OPS), per_channel=per_channel,
            use_external_data_format=False, reduce_range=True,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                           "UseQDQContribOps": False,
                           "QDQOpTypePerChannelSupportToAxis": {"ConvTranspose": 1}})
        shutil.rmtree(work)
        check_qdq_graph(tmp / INT8_GRAPH)
        for role, name in manifest["graphs"].items():
            if role != "infer":
                shutil.copy2(src / name, tmp / name)
        for name in {manifest["theta0"], manifest.get("weights"),
                     manifest.get("stats0")} - {None}:
            shutil.copy2(src / name, tmp / name)
        fields = _manifest_fields(manifest)
        fields["graphs"]["infer"] = INT8_GRAPH
        fields["precision"] = {role: ("int8-qdq" if role == "infer" else "fp32")
                               for role in fields["graphs"]}
        fields["quantization"] = {
            "format": "QDQ", "graph": "infer", "calibrator": method,
            "percentile": float(percentile) if method == "percentile" else None,
            "histogram_bins": int(bins) if method != "minmax" else None,
            "ops": list(QUANTIZED_OPS), "activations": "int8 symmetric per tensor",
            "weights": "int8 symmetric, 7-bit range, " + ("per channel" if per_channel else "per tensor"),
            "calibration_images": reader.used, "skipped_images": len(reader.skipped),
            "calibration_theta": "theta0", "source_manifest_sha256": manifest["manifest_sha256"],
            "onnxruntime": _version("onnxruntime")}
        result = write_manifest(tmp, fields)
        _publish(tmp, out_dir)
        return result
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_qdq_graph(path) -> dict:
    """Check a quantised graph is plain ONNX QDQ that TensorRT can consume: standard
    domain only, QuantizeLinear/DequantizeLinear present, and theta never quantised.
    Returns op counts; raises GrataError otherwise."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise GrataError(f"{path}: node {node.name or node.op_type} is in domain "
                             f"{node.domain!r}; TensorRT takes standard ONNX only")
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    if not counts.get("QuantizeLinear") or not counts.get("DequantizeLinear"):
        raise GrataError(f"{path}: no QuantizeLinear/DequantizeLinear nodes")
    producers = {o: n for n in model.graph.node for o in n.output}
    moves = {"Slice", "Gather", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Cast", "Split"}

    def is_theta(name: str) -> bool:  # theta itself, or a piece of it (no arithmetic)
        while name != "theta":
            node = producers.get(name)
            if node is None or node.op_type not in moves:
                return False
            name = node.input[0]
        return True

    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and is_theta(node.input[0]):
            raise GrataError(f"{path}: theta is quantised ({node.name}); it must stay float")
    # nor anything computed from theta alone (a scale or shift made of it)
    ops = {n.name: n.op_type for n in model.graph.node}
    theta_path, _ = adapted_nodes(model)
    for name in theta_path:
        if ops[name] in ("QuantizeLinear", "DequantizeLinear"):
            raise GrataError(f"{path}: a tensor made of theta is quantised ({name}); it "
                             f"must stay float")
    return counts


def _shared_weights(models: dict, folder: Path, name: str = "weights.bin",
                    threshold: int = 1024) -> None:
    """Move large initializers of several graphs into one external file; an initializer
    with the same name and bytes in several graphs is stored once."""
    import onnx
    stored: dict[tuple[str, bytes], tuple[int, int]] = {}
    with open(folder / name, "wb") as f:
        for model in models.values():
            for t in model.graph.initializer:
                if not t.HasField("raw_data") or len(t.raw_data) < threshold:
                    continue
                data = t.raw_data
                key = (t.name, data)
                if key not in stored:
                    pad = (-f.tell()) % 64
                    f.write(b"\0" * pad)
                    stored[key] = (f.tell(), len(data))
                    f.write(data)
                offset, length = stored[key]
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
                del t.external_data[:]
                for k, v in (("location", name), ("offset", str(offset)),
                             ("length", str(length))):
                    e = t.external_data.add()
                    e.key, e.value = k, v


def adapted_nodes(model, inputs=ADAPTED_INPUTS) -> tuple[list[str], list[str]]:
    """(path, meet): names of the nodes of `model` that read an adapted graph input.

    `path` nodes compute from adapted inputs and constants only (theta's slices, the
    arithmetic of a scale and shift); `meet` nodes are where such a tensor meets an
    activation (InstanceNormalization, BatchNormalization, Mul, Add). Constants are the
    initializers and what is computed from them alone; integer tensors (shapes, indices,
    quantised values) are never activations but make nothing constant."""
    import onnx
    graph = onnx.shape_inference.infer_shapes(model).graph
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    const = {t.name for t in graph.initializer}
    adapted = {i.name for i in graph.input if i.name in inputs}
    path, meet = [], []

    def is_float(name: str) -> bool:  # unknown types count as float (an activation)
        return types.get(name, onnx.TensorProto.FLOAT) in floats

    for node in graph.node:
        ins = [i for i in node.input if i]
        reads = [i for i in ins if i in adapted]
        activations = [i for i in ins if i not in adapted and i not in const and is_float(i)]
        if not reads:
            if all(i in const for i in ins):
                const.update(node.output)  # constants and what is computed from them
            continue
        if activations:
            meet.append(node.name)
        else:
            path.append(node.name)
            adapted.update(node.output)
    return path, meet


def drop_round_trips(model) -> int:
    """Remove float32 -> float16 -> float32 Cast pairs (the converter puts one between
    any two float32 nodes, which would round theta to float16 on its way to a node kept
    in float32): the second Cast's readers read the float32 tensor itself. Returns how
    many pairs were removed."""
    import onnx
    graph = model.graph
    FLOAT, HALF = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    producer = {o: n for n in graph.node for o in n.output}

    def cast_to(node) -> int | None:
        if node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    replace = {}
    for node in graph.node:
        first = producer.get(node.input[0]) if node.input else None
        if (cast_to(node) == FLOAT and first is not None and cast_to(first) == HALF
                and types.get(first.input[0]) == FLOAT):
            replace[node.output[0]] = first.input[0]
    outputs = {o.name for o in graph.output}
    replace = {k: v for k, v in replace.items() if k not in outputs}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in replace:
                node.input[i] = replace[name]
    # drop the Casts nobody reads any more
    while True:
        read = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and n.output[0] not in read]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    return len(replace)


def convert_fp16(artifacts, out_dir) -> dict:
    """Copy `artifacts` to `out_dir` with every graph in float16 inside, float32 at the
    inputs and outputs; returns the new manifest."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    src, out_dir = Path(artifacts), Path(out_dir)
    if out_dir.resolve() == src.resolve():
        raise GrataError("--out must differ from --artifacts")
    manifest = load_manifest(src)
    if any(p != "fp32" for p in manifest.get("precision", {}).values()):
        raise GrataError(f"artifact {src} is not float32 throughout; convert float32 "
                         f"artifacts")
    tmp = _staging(out_dir)
    try:
        converted, kept = {}, {}
        for role in manifest["graphs"]:
            model = onnx.load(str(src / manifest["graphs"][role]))
            block = list(DEFAULT_OP_BLOCK_LIST) + ([] if role.startswith("infer")
                                                   else list(FP16_KEEP_FLOAT32))
            path, meet = adapted_nodes(model)
            if len({n.name for n in model.graph.node}) != len(model.graph.node):
                raise GrataError(f"{manifest['graphs'][role]}: node names are not unique; "
                                 f"export again")
            kept[role] = len(path) + len(meet)
            converted[role] = convert_float_to_float16(
                model, keep_io_types=True, op_block_list=block,
                node_block_list=path + meet)
            drop_round_trips(converted[role])
        weights = "weights.bin"
        _shared_weights(converted, tmp, weights)
        fields = _manifest_fields(manifest)
        for role, model in converted.items():
            name = Path(manifest["graphs"][role]).stem + "_fp16.onnx"
            onnx.save(model, str(tmp / name))
            fields["graphs"][role] = name
        for name in {manifest["theta0"], manifest.get("stats0")} - {None}:
            shutil.copy2(src / name, tmp / name)
        fields["weights"] = weights
        fields["precision"] = {role: "fp16" for role in fields["graphs"]}
        fields["fp16"] = {"io": "float32", "kept_float32_ops": list(FP16_KEEP_FLOAT32),
                          "kept_float32_adapted_nodes": kept,
                          "adapted_inputs": list(ADAPTED_INPUTS),
                          "source_manifest_sha256": manifest["manifest_sha256"]}
        result = write_manifest(tmp, fields)
        _publish(tmp, out_dir)
        return result
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
