"""lightning-merge: fine-tune-then-merge for PyTorch Lightning (TSV-M, SFTM, TIES, task arithmetic).

The merge core (:mod:`lightning_merge.functional`, :mod:`lightning_merge.methods`) imports only torch; the
Lightning pieces (``MergeCallback``, ``MergedEvalLoop``) are imported on first use.
"""

from typing import Any

from lightning_merge.methods import (
    METHODS,
    SFTM,
    TIES,
    TSVM,
    Average,
    MergeMethod,
    TaskArithmetic,
    get_method,
)

__version__ = "0.1.0"

_LAZY = {
    "MergeCallback": "lightning_merge.callbacks",
    "MergedEvalLoop": "lightning_merge.evaluation",
    "MergeReport": "lightning_merge.evaluation",
    "EvalResult": "lightning_merge.evaluation",
    "search_scaling": "lightning_merge.evaluation",
    "merge_checkpoints": "lightning_merge.engine",
    "TSVC": "lightning_merge.compress",
    "compress_checkpoints": "lightning_merge.compress",
    "load_compressed": "lightning_merge.compress",
    "open_source": "lightning_merge.io",
    "load_adapter": "lightning_merge.lora",
    "merge_adapters": "lightning_merge.lora",
    "merge_adapters_into_base": "lightning_merge.lora",
    "merge_into_base": "lightning_merge.lora",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_merge' has no attribute {name!r}")


__all__ = [
    "METHODS",
    "SFTM",
    "TIES",
    "TSVC",
    "TSVM",
    "Average",
    "EvalResult",
    "MergeCallback",
    "MergeReport",
    "MergedEvalLoop",
    "MergeMethod",
    "TaskArithmetic",
    "__version__",
    "compress_checkpoints",
    "get_method",
    "load_compressed",
    "load_adapter",
    "merge_adapters",
    "merge_adapters_into_base",
    "merge_checkpoints",
    "merge_into_base",
    "open_source",
    "search_scaling",
]
