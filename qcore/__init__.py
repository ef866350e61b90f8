"""qcore: the compute core of Quantization Playground.

Pure PyTorch (with numpy and pandas for tables); never imports a UI library. Nothing here
changes a model or tensor handed to it.

    import qcore
    model = qcore.load_model("mnist-cnn")
    c = qcore.compress(model, qcore.CompressionConfig(quant=qcore.QuantConfig(bits=4)))
    print(qcore.evaluate(c.model, qcore.load_dataset("mnist-5k")).accuracy, c.size_bytes)

The names below are the public API (see DESIGN.md); submodules hold the plumbing.
"""

from qcore.affine import QParams, dequantize_codes, quantize_codes
from qcore.analysis import Histogram, activation_histogram, layer_histogram, weight_histogram
from qcore.blocks import Block, removable_blocks, without_blocks
from qcore.compress import Compressed, LayerResult, compress, sqnr_db
from qcore.config import ActQuantConfig, CompressionConfig, PruneConfig, QuantConfig, Settings
from qcore.data import (
    Dataset,
    DatasetInfo,
    DatasetNotFound,
    dataset_info,
    list_datasets,
    load_dataset,
)
from qcore.debug import Analysis, analyze
from qcore.deep import DeepCompressionResult, deep_compression
from qcore.evaluate import Metrics, agreement, evaluate, metrics_from_logits
from qcore.executors import ProcessExecutor, RayExecutor
from qcore.export import Packed, export_packed, load_packed, packed_bytes, read_header
from qcore.finetune import FinetuneConfig, FinetuneResult, finetune
from qcore.fold import weight_layers
from qcore.graph import Graph, Variant, graph_of
from qcore.mixed import MixedPrecisionResult, UniformChoice, mixed_precision
from qcore.models import ModelInfo, check_fit, list_models, load_model, model_info
from qcore.onnx import (
    CpuInt8,
    Latency,
    OnnxExport,
    cpu_int8,
    export_onnx,
    integer_kernels,
    measure_latency,
    run_onnx,
)
from qcore.prune import magnitude_mask, prune_tensor
from qcore.ptq import Equalization, channel_ranges
from qcore.quant import choose_qparams, quantize_tensor, quantize_with_params
from qcore.refs import DatasetRef, ModelRef
from qcore.robustness import PERTURBATIONS, flip_bits, noisy_weights, perturb_inputs, robustness
from qcore.sensitivity import layer_sensitivity, sensitivity_matrix
from qcore.sweep import SweepGrid, pareto_front, sweep
from qcore.teach import (
    ErrorCurve,
    ErrorHistogram,
    Journey,
    clip_error_curve,
    clip_note,
    empty_levels,
    error_histogram,
    fixed_point,
    random_weight_index,
    sqnr_by_bits,
    trap_hint,
    weight_journey,
)

__all__ = [
    # models and data, and the references caches and workers are keyed by
    "list_models", "model_info", "ModelInfo", "load_model", "check_fit",
    "list_datasets", "dataset_info", "DatasetInfo", "load_dataset", "Dataset",
    "DatasetNotFound", "ModelRef", "DatasetRef",
    # what to do: configs, and the flat settings a person sets (URL, CLI)
    "QuantConfig", "PruneConfig", "CompressionConfig", "ActQuantConfig", "Settings",
    # the maths primitives
    "QParams", "choose_qparams", "quantize_codes", "dequantize_codes", "quantize_tensor",
    "quantize_with_params", "magnitude_mask", "prune_tensor", "sqnr_db",
    # the runtime and the pipeline
    "Graph", "Variant", "graph_of", "weight_layers", "compress", "Compressed",
    "Equalization", "channel_ranges",
    "LayerResult", "removable_blocks", "without_blocks", "Block",
    # measuring
    "evaluate", "metrics_from_logits", "Metrics", "agreement", "weight_histogram",
    "activation_histogram",
    "layer_histogram", "Histogram",
    # the packed file
    "export_packed", "packed_bytes", "load_packed", "read_header", "Packed",
    # real int8: ONNX (QDQ) export, ONNX Runtime, latency and the CPU's int8 instructions
    "export_onnx", "OnnxExport", "run_onnx", "measure_latency", "Latency", "cpu_int8",
    "CpuInt8", "integer_kernels",
    # analyses
    "SweepGrid", "sweep", "pareto_front", "layer_sensitivity", "sensitivity_matrix",
    "mixed_precision", "MixedPrecisionResult", "UniformChoice",
    # where a grid's rows run: worker processes or a Ray cluster (executor= on the grids)
    "ProcessExecutor", "RayExecutor",
    # robustness: input noise, FGSM / PGD, weight noise, bit flips
    "robustness", "PERTURBATIONS", "perturb_inputs", "noisy_weights", "flip_bits",
    # training-aware compression: quantization-aware fine-tuning
    "FinetuneConfig", "FinetuneResult", "finetune",
    # Deep Compression: prune + retrain, share weights + retrain centroids, Huffman coding
    "deep_compression", "DeepCompressionResult",
    # teaching: one weight's journey, the clipping trade-off, hints
    "weight_journey", "Journey", "random_weight_index", "clip_error_curve", "ErrorCurve",
    "trap_hint", "clip_note", "empty_levels", "fixed_point", "error_histogram",
    "ErrorHistogram", "sqnr_by_bits",
    # debugging one setting: weights or activations, which layer, local or piled up
    "analyze", "Analysis",
]  # fmt: skip
