"""Real int8: a compressed model as an ONNX file in QDQ form, run by ONNX Runtime, timed.

:func:`export_onnx` writes the compressed model's graph (BatchNorm folded as compressed)
with QuantizeLinear/DequantizeLinear pairs:

- an 8-bit weight is an int8 initializer (uint8 when asymmetric) holding qcore's codes,
  with exactly qcore's float32 scales and integer zero points (per tensor, or per output
  channel on axis 0), read through DequantizeLinear;
- an 8-bit activation edge (:func:`qcore.activations.placement`: the input and each fused
  group's output) is ``QuantizeLinear -> DequantizeLinear`` with its calibrated scale and
  zero point; pooling, flattening and the identity repeat their input's pair, so the
  next layer reads a dequantized tensor and ONNX Runtime can fuse it into an integer kernel;
- any other width (1 to 7 or 9 to 16 bits, k-means codebooks, layers left float) has no
  integer kernel: the weight is written as its float32 dequantized values, an activation as
  float ops computing ``(clip(round(x * (1/s)) + z, qmin, qmax) - z) * s``, exactly as qcore
  simulates it. Such layers are named in ``fake_quant_layers`` with the reason.

Which layers really run integer kernels is read from ONNX Runtime's optimised graph
(``QLinearConv``, ``QGemm``, ``QLinearMatMul``, ... named after the layer), not assumed.
Biases stay float32 inputs of the Conv/Gemm. Loading ONNX files from users is out of scope.

:func:`run_onnx` evaluates a file on a split (a :class:`qcore.Metrics`, so
``qcore.agreement`` compares it with the simulation); :func:`measure_latency` times a
PyTorch model or an ONNX file at one batch size and reports the CPU's int8 instructions:
without VNNI or AMX an x86 CPU multiplies int8 through 16-bit sums, and int8 need not be
faster than float32.
"""

from __future__ import annotations

import math
import operator
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import fx, nn
from torch.nn import functional as F

from qcore.activations import ActRange, placement
from qcore.compress import Compressed, LayerResult
from qcore.data import Dataset
from qcore.evaluate import Metrics, metrics_from_logits
from qcore.graph import Variant, param_key

__all__ = [
    "OnnxExport", "Latency", "CpuInt8", "export_onnx", "run_onnx", "measure_latency",
    "cpu_int8", "integer_kernels", "INTEGER_OPS", "deploy", "Deployment", "DeployRow",
    "sweep_latency", "SWEEP_LATENCY_COLUMNS",
]  # fmt: skip

OPSET = 17  # per-channel QuantizeLinear/DequantizeLinear need 13; 17 runs everywhere
IR_VERSION = 8
# ONNX Runtime's fused integer kernels (what a QDQ group becomes when it can run in int8)
INTEGER_OPS = frozenset({"QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat",
                         "ConvInteger", "MatMulInteger", "QLinearAdd", "NhwcQLinearConv",
                         "QLinearGlobalAveragePool", "QLinearAveragePool"})  # fmt: skip
_WEIGHT_OPS = frozenset({"QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat",
                         "ConvInteger", "MatMulInteger", "NhwcQLinearConv"})  # fmt: skip
# x86 and Arm flags in /proc/cpuinfo that concern int8 arithmetic, and those that make it fast
INT8_FLAGS = ("avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8",
              "asimddp", "i8mm")  # fmt: skip
FAST_INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"})


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote. ``integer_layers`` and ``fake_quant_layers`` together
    name every compressed layer; ``reasons`` says why each fake-quant layer is not integer."""

    path: Path
    size_bytes: int
    integer_layers: tuple[str, ...]
    fake_quant_layers: tuple[str, ...]
    reasons: dict[str, str] = field(default_factory=dict)
    opset: int = OPSET


@dataclass(frozen=True)
class CpuInt8:
    """The CPU's int8 instruction support, read from /proc/cpuinfo."""

    model: str
    flags: tuple[str, ...]  # those of INT8_FLAGS present

    @property
    def fast_int8(self) -> bool:
        """True with an int8 dot-product instruction (VNNI, AMX, Arm dotprod / i8mm)."""
        return bool(FAST_INT8_FLAGS & set(self.flags))

    def sentence(self) -> str:
        """What the flags mean for int8 speed, in one sentence."""
        has = ", ".join(self.flags) if self.flags else "none of " + ", ".join(INT8_FLAGS)
        if self.fast_int8:
            return (f"This CPU ({self.model}) has int8 dot-product instructions ({has}), so "
                    "int8 kernels can beat float32.")  # fmt: skip
        return (
            f"This CPU ({self.model}) has no int8 dot-product instruction (int8 flags: {has}; "
            "no AVX-512 VNNI, AVX-VNNI or AMX): int8 multiplies go through 16-bit sums, so "
            "int8 need not be faster than float32 here."
        )


@dataclass(frozen=True)
class Latency:
    """Wall-clock time of one forward pass at ``batch_size``, over ``runs`` runs."""

    median_ms: float
    p90_ms: float
    batch_size: int
    threads: int
    runs: int
    runtime: str  # "PyTorch" or "ONNX Runtime"
    cpu: CpuInt8


def cpu_int8(cpuinfo: str | None = None) -> CpuInt8:
    """The int8 flags of this CPU (or of the given /proc/cpuinfo text)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    model = "unknown CPU"
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key == "model name" and model == "unknown CPU":
            model = value.strip()
    return CpuInt8(model, tuple(f for f in INT8_FLAGS if f in flags))


# ------------------------------------------------------------------------------- building


class _Builder:
    """ONNX nodes and initializers, with names made unique."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.inits: list = []
        self.names: set[str] = set()

    def name(self, base: str) -> str:
        out, i = base, 1
        while out in self.names:
            out, i = f"{base}_{i}", i + 1
        self.names.add(out)
        return out

    def const(self, base: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), n))
        return n

    def node(self, op: str, inputs: list[str], base: str, **attrs) -> str:
        from onnx import helper

        out = self.name(base)
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(f"{base}:{op}"),
                                           **attrs))  # fmt: skip
        return out


def _zero_point_dtype(qmin: int) -> type:
    return np.uint8 if qmin >= 0 else np.int8


def _qdq(b: _Builder, x: str, r: ActRange, tag: str) -> str:
    """``x`` through the edge's quantizer: a Q/DQ pair at 8 bits, float ops at other widths."""
    qp = r.qparams
    scale = np.float32(qp.scale[0])
    if r.bits == 8:
        dt = _zero_point_dtype(qp.qmin)
        s = b.const(f"{tag}.scale", np.array(scale, np.float32))
        z = b.const(f"{tag}.zero_point", np.array(int(qp.zero_point[0]), dt))
        q = b.node("QuantizeLinear", [x, s, z], f"{tag}.quantized")
        return b.node("DequantizeLinear", [q, s, z], f"{tag}.dequantized")
    # the same float32 operations as qcore.affine.fake_quantize
    inv = b.const(f"{tag}.inv_scale", (1.0 / qp.scale).numpy().astype(np.float32).reshape(()))
    s = b.const(f"{tag}.scale", np.array(scale, np.float32))
    z = b.const(f"{tag}.zero_point", np.array(float(qp.zero_point[0]), np.float32))
    lo = b.const(f"{tag}.qmin", np.array(float(qp.qmin), np.float32))
    hi = b.const(f"{tag}.qmax", np.array(float(qp.qmax), np.float32))
    t = b.node("Mul", [x, inv], f"{tag}.steps")
    t = b.node("Round", [t], f"{tag}.rounded")
    t = b.node("Add", [t, z], f"{tag}.shifted")
    t = b.node("Clip", [t, lo, hi], f"{tag}.codes")
    t = b.node("Sub", [t, z], f"{tag}.centered")
    return b.node("Mul", [t, s], f"{tag}.fake_quantized")


def _integer_weight(r: LayerResult | None) -> bool:
    """An 8-bit uniform grid: codes fit int8/uint8 and DequantizeLinear reads them exactly."""
    return (r is not None and r.qparams is not None and r.bits == 8 and not r.qparams.binary
            and r.codebook is None)  # fmt: skip


def _weight(b: _Builder, layer: str, r: LayerResult | None, value: torch.Tensor) -> str:
    """The weight input of a Conv/Gemm: int8 codes through DequantizeLinear, else float."""
    if not _integer_weight(r):
        return b.const(f"{layer}.weight", value.detach().float().numpy())
    qp = r.qparams
    dt = _zero_point_dtype(qp.qmin)
    codes = b.const(f"{layer}.weight_quantized", r.codes.numpy().astype(dt))
    g = qp.scale.numel()
    if g == 1:
        s = b.const(f"{layer}.weight_scale", np.array(qp.scale[0].item(), np.float32))
        z = b.const(f"{layer}.weight_zero_point", np.array(int(qp.zero_point[0]), dt))
        return b.node("DequantizeLinear", [codes, s, z], f"{layer}.weight")
    s = b.const(f"{layer}.weight_scale", qp.scale.numpy().astype(np.float32))
    z = b.const(f"{layer}.weight_zero_point", qp.zero_point.numpy().astype(dt))
    return b.node("DequantizeLinear", [codes, s, z], f"{layer}.weight", axis=0)


def _ints(v, n: int) -> list[int]:
    return [int(x) for x in (v if isinstance(v, tuple | list) else (v,) * n)]


def _unsupported(what: str) -> ValueError:
    return ValueError(
        f"The ONNX export does not support {what}; it handles conv, linear, BatchNorm, ReLU, "
        "max and average pooling, flatten and additions (the sample architectures)."
    )


_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}
_RELUS = {F.relu, torch.relu, "relu", "relu_"}


def _module_node(b: _Builder, n: fx.Node, mod: nn.Module, x: str, P: dict,
                 records: dict[str, LayerResult]) -> str:  # fmt: skip
    t = str(n.target)
    if isinstance(mod, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        if isinstance(mod.padding, str) or mod.padding_mode != "zeros":
            raise _unsupported(f"padding {mod.padding!r} ({mod.padding_mode}) in {t}")
        k = len(mod.kernel_size)
        w = _weight(b, t, records.get(t), P[param_key(t, "weight")])
        bias = records[t].bias if t in records and records[t].bias is not None else \
            P.get(param_key(t, "bias"))  # fmt: skip
        ins = [x, w] + ([] if bias is None else [b.const(f"{t}.bias", bias.float().numpy())])
        pads = _ints(mod.padding, k)
        return b.node("Conv", ins, t, kernel_shape=_ints(mod.kernel_size, k),
                      strides=_ints(mod.stride, k), pads=pads + pads,
                      dilations=_ints(mod.dilation, k), group=int(mod.groups))  # fmt: skip
    if isinstance(mod, nn.Linear):
        w = _weight(b, t, records.get(t), P[param_key(t, "weight")])
        bias = records[t].bias if t in records and records[t].bias is not None else \
            P.get(param_key(t, "bias"))  # fmt: skip
        ins = [x, w] + ([] if bias is None else [b.const(f"{t}.bias", bias.float().numpy())])
        return b.node("Gemm", ins, t, transB=1)
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        names = [b.const(f"{t}.{a}", P[param_key(t, a)].float().numpy())
                 for a in ("weight", "bias", "running_mean", "running_var")]  # fmt: skip
        return b.node("BatchNormalization", [x, *names], t, epsilon=float(mod.eps))
    if isinstance(mod, nn.ReLU):
        return b.node("Relu", [x], t)
    if isinstance(mod, nn.ReLU6):
        lo = b.const(f"{t}.min", np.array(0.0, np.float32))
        hi = b.const(f"{t}.max", np.array(6.0, np.float32))
        return b.node("Clip", [x, lo, hi], t)
    if isinstance(mod, nn.MaxPool2d) and not mod.return_indices:
        pads = _ints(mod.padding, 2)
        return b.node("MaxPool", [x], t, kernel_shape=_ints(mod.kernel_size, 2),
                      strides=_ints(mod.stride, 2), pads=pads + pads,
                      dilations=_ints(mod.dilation, 2), ceil_mode=int(mod.ceil_mode))  # fmt: skip
    if isinstance(mod, nn.AvgPool2d) and mod.divisor_override is None:
        pads = _ints(mod.padding, 2)
        return b.node("AveragePool", [x], t, kernel_shape=_ints(mod.kernel_size, 2),
                      strides=_ints(mod.stride, 2), pads=pads + pads,
                      ceil_mode=int(mod.ceil_mode),
                      count_include_pad=int(mod.count_include_pad))  # fmt: skip
    if isinstance(mod, nn.AdaptiveAvgPool2d) and _ints(mod.output_size, 2) == [1, 1]:
        return b.node("GlobalAveragePool", [x], t)
    if isinstance(mod, nn.Flatten) and mod.start_dim == 1 and mod.end_dim == -1:
        return b.node("Flatten", [x], t, axis=1)
    if isinstance(mod, nn.Identity | nn.Dropout):
        return x
    raise _unsupported(f"{type(mod).__name__} ({t})")


def _build(compressed: Compressed, input_shape: tuple[int, ...] | None = None):
    """The ONNX model of ``compressed`` and which layers hold int8 codes (or why not)."""
    from onnx import TensorProto, helper

    graph = compressed.graph
    gm = graph.module
    records = {r.name: r for r in compressed.layers}
    act = compressed.config.act
    acts = dict(compressed.activations)
    p = placement(graph, list(records), act.output if act is not None else False)
    P = graph.tensors(compressed.replacements())
    b = _Builder()
    b.names.update({"input", "logits"})
    env: dict[fx.Node, str] = {}
    for n in graph.nodes:
        if n.op == "placeholder":
            out = "input"
        elif n.op == "output":
            src = n.args[0]
            if not isinstance(src, fx.Node):
                raise _unsupported("a model with several outputs")
            b.nodes.append(helper.make_node("Identity", [env[src]], ["logits"], name="logits"))
            continue
        elif n.op == "call_module":
            out = _module_node(b, n, gm.get_submodule(n.target), env[n.args[0]], P, records)
        elif n.op in ("call_function", "call_method") and n.target in _ADDS:
            a, c = n.args[:2]
            if not (isinstance(a, fx.Node) and isinstance(c, fx.Node)) or n.kwargs:
                raise _unsupported(f"the addition {n.name} of a constant")
            out = b.node("Add", [env[a], env[c]], n.name)
        elif n.op in ("call_function", "call_method") and n.target in _RELUS:
            out = b.node("Relu", [env[n.args[0]]], n.name)
        elif n.op == "call_function" and n.target is torch.flatten and \
                tuple(n.args[1:]) in ((1,), (1, -1)) and not n.kwargs:  # fmt: skip
            out = b.node("Flatten", [env[n.args[0]]], n.name, axis=1)
        else:
            raise _unsupported(f"the operation {n.name} ({n.target})")
        edge = "input" if n.op == "placeholder" else n.name
        if edge in acts:  # an edge (or an average rounded on its input's grid)
            out = _qdq(b, out, acts[edge], edge)
        elif edge in p.shared and acts.get(p.shared[edge]) is not None \
                and acts[p.shared[edge]].bits == 8:  # fmt: skip
            # max pool, flatten, identity: the input's pair again, so the next layer reads a
            # dequantized tensor (values unchanged: they already lie on that grid)
            out = _qdq(b, out, acts[p.shared[edge]], edge)
        env[n] = out
    shape = list(graph.spec["input_shape"]) if graph.spec else input_shape
    if shape is None:
        raise ValueError("This model records no input shape; pass input_shape=(C, H, W) (one "
                         "example's shape, without the batch).")  # fmt: skip
    x_shape = ["batch", *(int(d) for d in shape)]
    classes = graph.spec["num_classes"] if graph.spec else "classes"
    g = helper.make_graph(
        b.nodes, "qcore",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        b.inits,
    )  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="qcore")  # fmt: skip
    model.ir_version = IR_VERSION
    reasons = {}
    logits_head = p.groups.get(p.logits or "", ("",))[0]
    for name, r in records.items():
        edge = p.inputs.get(name)
        if r.codebook is not None:
            reasons[name] = "k-means codebook: no integer kernel (float32 shared values)"
        elif r.qparams is None:
            reasons[name] = "left in float32"
        elif not _integer_weight(r):
            reasons[name] = f"{r.bits}-bit weights: no integer kernel (float32 fake-quant values)"
        elif act is None:
            reasons[name] = "activations are float32: int8 weights, float arithmetic"
        elif edge is None or acts.get(edge) is None:
            reasons[name] = "its input stays float"
        elif acts[edge].bits != 8:
            reasons[name] = f"{acts[edge].bits}-bit input activations: no integer kernel"
        elif name == logits_head and not act.output:
            reasons[name] = ("its output, the logits, stays float (ActQuantConfig(output=True) "
                             "quantizes it): int8 weights, float arithmetic")  # fmt: skip
    return model, reasons


def _session(path: str | Path, threads: int | None = None, optimized: str | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if optimized is not None:  # the graph after ONNX Runtime's fusions, to read back
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = optimized
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def integer_kernels(path: str | Path, layers: list[str] | tuple[str, ...]) -> dict[str, str]:
    """The layers ONNX Runtime runs with an integer kernel, and that kernel's op type.

    Read from the session's optimised graph: a fused node keeps its layer's name.
    """
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "optimized.onnx")
        _session(path, 1, optimized=out)
        nodes = onnx.load(out, load_external_data=False).graph.node
    found = {}
    for layer in layers:
        for node in nodes:
            if node.op_type in _WEIGHT_OPS and (node.name == layer or
                                                node.name.startswith(f"{layer}:")):  # fmt: skip
                found[layer] = node.op_type
    return found


def export_onnx(
    compressed: Compressed, path: str | Path, input_shape: tuple[int, ...] | None = None
) -> OnnxExport:
    """Write ``compressed`` as an ONNX file in QDQ form (module docstring) and say which
    layers ONNX Runtime runs with integer kernels. ``input_shape`` (one example's shape) is
    needed only for a model that does not record it (``qcore_spec``)."""
    import onnx

    if not isinstance(compressed, Compressed):
        raise ValueError("export_onnx needs the result of qcore.compress.")
    model, reasons = _build(compressed, input_shape)
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    path.write_bytes(model.SerializeToString())
    names = [r.name for r in compressed.layers]
    ran = integer_kernels(path, [n for n in names if n not in reasons])
    for n in names:
        if n not in reasons and n not in ran:
            # e.g. an unfolded BatchNorm, or a ReLU kept before a signed (symmetric) output
            reasons[n] = ("ONNX Runtime did not fuse its quantize/dequantize group into an "
                          "integer kernel: float arithmetic on int8 weights")  # fmt: skip
    return OnnxExport(
        path=path,
        size_bytes=path.stat().st_size,
        integer_layers=tuple(n for n in names if n not in reasons),
        fake_quant_layers=tuple(n for n in names if n in reasons),
        reasons={n: reasons[n] for n in names if n in reasons},
    )


def run_onnx(path: str | Path, dataset: Dataset, batch_size: int = 256) -> Metrics:
    """Evaluate an exported ONNX file with ONNX Runtime on ``dataset`` (CPU)."""
    sess = _session(path)
    x = dataset.inputs().numpy()
    outs = [sess.run(["logits"], {"input": x[i : i + batch_size]})[0]
            for i in range(0, len(x), batch_size)]  # fmt: skip
    logits = torch.from_numpy(np.concatenate(outs)) if outs else torch.empty(0)
    return metrics_from_logits(logits, dataset.y, len(dataset.classes))


def measure_latency(
    model_or_onnx_path: nn.Module | str | Path,
    dataset: Dataset,
    batch_size: int = 1,
    threads: int | None = None,
    seconds: float = 1.0,
    min_runs: int = 5,
    max_runs: int = 200,
) -> Latency:
    """Median and 90th-percentile milliseconds of one forward pass on ``batch_size`` images.

    A module runs through its shared traced graph (as qcore evaluates it); a path runs in
    ONNX Runtime with ``threads`` intra-op threads (default: PyTorch's count). Runs repeat
    for about ``seconds`` (at least ``min_runs``, at most ``max_runs``) after one warm-up.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"The batch size must be a whole number of at least 1; got {batch_size}.")
    n = len(dataset.x)
    if n == 0:
        raise ValueError("The dataset is empty; there is nothing to time.")
    idx = torch.arange(batch_size) % n  # the first images, repeated when the split is smaller
    x = dataset.inputs(idx)
    if isinstance(model_or_onnx_path, nn.Module):
        run = Variant.of(model_or_onnx_path).runner()
        used = torch.get_num_threads()
        runtime = "PyTorch"

        def once() -> None:
            with torch.inference_mode():
                run(x)
    else:
        path = Path(model_or_onnx_path)
        if not path.is_file():
            raise ValueError(f"No ONNX file at {path}; export one with qcore.export_onnx.")
        used = threads or torch.get_num_threads()
        sess = _session(path, used)
        feed = {"input": x.numpy()}
        runtime = "ONNX Runtime"

        def once() -> None:
            sess.run(["logits"], feed)
    times = _time(once, seconds, min_runs, max_runs)
    return Latency(
        median_ms=statistics.median(times), p90_ms=float(np.percentile(times, 90)),
        batch_size=batch_size, threads=used, runs=len(times), runtime=runtime, cpu=cpu_int8(),
    )  # fmt: skip


def _time(once: Callable[[], None], seconds: float, min_runs: int, max_runs: int) -> list[float]:
    once()  # warm-up: lazy allocations, kernel selection
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs
                                     or time.perf_counter() - start < seconds):  # fmt: skip
        t0 = time.perf_counter()
        once()
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


# ------------------------------------------------------------------------- the deploy table

BATCH_SIZES = (1, 256)  # one image (interactive) and a large batch (throughput)


@dataclass(frozen=True)
class DeployRow:
    """One runtime: its test accuracy, agreement, latency per batch size and file bytes."""

    runtime: str  # "float PyTorch", "float ONNX Runtime", "simulated ...", "int8 ONNX Runtime"
    accuracy: float
    agrees_with_float: float  # fraction of test images with the float model's prediction
    agrees_with_simulated: float  # ... with qcore's simulated (fake-quant) prediction
    latency: tuple[Latency, ...]  # one per batch size
    file_bytes: int | None  # the ONNX file; None for a PyTorch model held in memory


@dataclass(frozen=True)
class Deployment:
    """Float PyTorch, float ONNX Runtime, the simulation and the quantized ONNX file, side by
    side on one test split and one CPU."""

    rows: tuple[DeployRow, ...]
    export: OnnxExport  # the quantized file
    float_export: OnnxExport
    cpu: CpuInt8
    label: str  # the setting, e.g. "W8A8"

    def integer_sentence(self) -> str:
        """Which layers ran integer kernels in ONNX Runtime, and which did not and why."""
        e = self.export
        if not e.integer_layers:
            text = "No layer ran an integer kernel in ONNX Runtime"
        else:
            text = (f"{len(e.integer_layers)} of {len(e.integer_layers) + len(e.fake_quant_layers)}"
                    f" layers ran ONNX Runtime integer kernels: {', '.join(e.integer_layers)}")
        rest = "; ".join(f"{n}: {why}" for n, why in e.reasons.items())
        return f"{text}." + (f" In float: {rest}." if rest else "")


def deploy(
    model: nn.Module,
    compressed: Compressed,
    test: Dataset,
    path: str | Path,
    float_path: str | Path,
    label: str = "quantized",
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    seconds: float = 0.5,
    progress: Callable[[int, int, str], None] | None = None,
) -> Deployment:
    """Export the float model and ``compressed`` to ONNX, evaluate both in ONNX Runtime and
    both in PyTorch on ``test``, and time each at every batch size.

    ``progress(done, total, what)`` is called after each step (export, evaluation, timing).
    """
    from qcore.compress import compress
    from qcore.config import CompressionConfig
    from qcore.evaluate import agreement, evaluate

    total = 4 + 4 * len(batch_sizes)
    done = 0

    def step(what: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, what)

    plain = compress(model, CompressionConfig(quant=None))  # the whole float model, folded
    float_export = export_onnx(plain, float_path)
    quant_export = export_onnx(compressed, path)
    step("exported the float and quantized ONNX files")
    base = evaluate(model, test)
    sim = evaluate(compressed.model, test)
    step("evaluated in PyTorch")
    f_ort = run_onnx(float_export.path, test)
    step("evaluated the float file in ONNX Runtime")
    q_ort = run_onnx(quant_export.path, test)
    step("evaluated the quantized file in ONNX Runtime")
    targets = [("float PyTorch", model, base, None),
               ("float ONNX Runtime", float_export.path, f_ort, float_export.size_bytes),
               (f"simulated {label} (PyTorch fake-quant)", compressed.model, sim, None),
               (f"{'int8' if quant_export.integer_layers else 'fake-quant'} ONNX Runtime "
                f"({label})", quant_export.path, q_ort, quant_export.size_bytes)]  # fmt: skip
    rows = []
    for name, target, m, nbytes in targets:
        lats = []
        for bs in batch_sizes:
            lats.append(measure_latency(target, test, bs, seconds=seconds))
            step(f"timed {name} at batch {bs}")
        rows.append(DeployRow(name, m.accuracy, agreement(m, base), agreement(m, sim),
                              tuple(lats), nbytes))  # fmt: skip
    return Deployment(tuple(rows), quant_export, float_export, cpu_int8(), label)


# ------------------------------------------------------------------ latency beside a sweep

SWEEP_LATENCY_COLUMNS = ("runtime", "latency_ms", "latency_p90_ms", "integer_layers")


def sweep_latency(
    model: nn.Module,
    test: Dataset,
    grid,
    calib: Dataset | None = None,
    batch_size: int = 1,
    seconds: float = 0.2,
    progress: Callable[[int, int, dict], None] | None = None,
) -> pd.DataFrame:
    """Real latency beside ``qcore.sweep(model, test, grid)``: one row per configuration,
    in the grid's order.

    A configuration ONNX Runtime runs with integer kernels (8-bit weights and 8-bit
    activations) is exported and timed at ``batch_size``: ``runtime`` "int8 ONNX Runtime",
    its median and p90 ms and how many layers ran integer. Any other row has no real
    runtime of its own (its accuracy is simulated only): ``runtime`` is None and its
    latency NaN, never a number measured on something else. ``df.attrs["float_ms"]`` is
    the float model's latency in ONNX Runtime at the same batch size, for reference.
    """
    from qcore.compress import compress
    from qcore.config import CompressionConfig

    configs = grid.configs()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plain = compress(model, CompressionConfig(quant=None))
        f = export_onnx(plain, Path(tmp) / "float.onnx")
        float_lat = measure_latency(f.path, test, batch_size, seconds=seconds)
        for i, cfg in enumerate(configs):
            row: dict = {"runtime": None, "latency_ms": math.nan, "latency_p90_ms": math.nan,
                         "integer_layers": 0}  # fmt: skip
            q, a = cfg.quant, cfg.act
            if q is not None and a is not None and a.bits == 8 and q.codebook != "kmeans" \
                    and any(q.bits_for(n) == 8 for n in graph_layers(model, cfg)):  # fmt: skip
                e = export_onnx(compress(model, cfg, calib=calib), Path(tmp) / f"{i}.onnx")
                if e.integer_layers:
                    lat = measure_latency(e.path, test, batch_size, seconds=seconds)
                    row = {"runtime": "int8 ONNX Runtime", "latency_ms": lat.median_ms,
                           "latency_p90_ms": lat.p90_ms,
                           "integer_layers": len(e.integer_layers)}  # fmt: skip
            rows.append(row)
            if progress is not None:
                progress(i + 1, len(configs), row)
    df = pd.DataFrame(rows, columns=list(SWEEP_LATENCY_COLUMNS))
    df.attrs.update(float_ms=float_lat.median_ms, float_p90_ms=float_lat.p90_ms,
                    batch_size=batch_size, threads=float_lat.threads,
                    cpu=float_lat.cpu.sentence())  # fmt: skip
    return df


def graph_layers(model: nn.Module, cfg) -> list[str]:
    """The names of the weight layers ``cfg`` compresses (all of them when it names none)."""
    from qcore.fold import weight_layers

    return list(weight_layers(model)) if cfg.layers is None else list(cfg.layers)
