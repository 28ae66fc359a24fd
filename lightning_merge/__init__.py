"""lightning-merge: fine-tune-then-merge for PyTorch Lightning (TSV-M, SFTM, TIES, task arithmetic)."""

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

__all__ = [
    "METHODS",
    "SFTM",
    "TIES",
    "TSVM",
    "Average",
    "MergeMethod",
    "TaskArithmetic",
    "__version__",
    "get_method",
]
