"""qcore: the compute core of Quantization Playground.

Pure PyTorch (with numpy and pandas for tables); never imports a UI library. Nothing here
changes a model or tensor handed to it.

    import qcore
    model = qcore.load_model("mnist-cnn")
    c = qcore.compress(model, qcore.CompressionConfig(quant=qcore.QuantConfig(bits=4)))
    print(qcore.evaluate(c.model, qcore.load_dataset("mnist-5k")).accuracy, c.size_bytes)
"""

from qcore.analysis import Histogram, layer_histogram, weight_histogram
from qcore.compress import Compressed, CompressedModel, LayerStats, compress, sqnr_db
from qcore.config import CLIP_MODES, CompressionConfig, PruneConfig, QuantConfig
from qcore.data import (
    Dataset,
    DatasetInfo,
    DatasetNotFound,
    data_root,
    dataset_info,
    list_datasets,
    load_dataset,
)
from qcore.evaluate import Metrics, agreement, evaluate
from qcore.export import export_packed, load_packed, packed_bytes, read_header
from qcore.fold import fold_batchnorm, weight_layers
from qcore.mixed import MixedPrecisionResult, mixed_precision
from qcore.models import ModelInfo, build_model, check_fit, list_models, load_model, model_info
from qcore.prune import magnitude_mask, prune_tensor
from qcore.quant import quantize_tensor, quantize_with_params
from qcore.sensitivity import layer_sensitivity, sensitivity_matrix
from qcore.sweep import SweepGrid, pareto_front, sweep

__all__ = [
    "CLIP_MODES",
    "Compressed",
    "CompressedModel",
    "CompressionConfig",
    "Dataset",
    "DatasetInfo",
    "DatasetNotFound",
    "Histogram",
    "LayerStats",
    "Metrics",
    "MixedPrecisionResult",
    "ModelInfo",
    "PruneConfig",
    "QuantConfig",
    "SweepGrid",
    "agreement",
    "build_model",
    "check_fit",
    "compress",
    "data_root",
    "dataset_info",
    "evaluate",
    "export_packed",
    "fold_batchnorm",
    "layer_histogram",
    "layer_sensitivity",
    "list_datasets",
    "list_models",
    "load_dataset",
    "load_model",
    "load_packed",
    "magnitude_mask",
    "mixed_precision",
    "model_info",
    "packed_bytes",
    "pareto_front",
    "prune_tensor",
    "quantize_tensor",
    "quantize_with_params",
    "read_header",
    "sensitivity_matrix",
    "sqnr_db",
    "sweep",
    "weight_histogram",
    "weight_layers",
]
