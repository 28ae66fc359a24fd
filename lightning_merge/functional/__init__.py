"""Pure-torch merge math. Never imports Lightning: every function takes one parameter's tensors and returns one."""

from lightning_merge.functional.lora import (
    LowRankUpdate,
    lora_balance,
    lora_compact,
    lora_dense,
    lora_merge,
    lora_scale,
    lora_sum,
    lora_svd,
    lora_task_features,
)
from lightning_merge.functional.merges import (
    average,
    sftm,
    sftm_factors,
    task_arithmetic,
    ties,
    trim_magnitude,
    tsv_m,
    tsv_m_factors,
)
from lightning_merge.functional.svd import (
    converged,
    gram_roots,
    orthogonalize,
    sti,
    task_features,
    truncated_svd,
    use_randomized,
)

__all__ = [
    "LowRankUpdate",
    "average",
    "converged",
    "gram_roots",
    "lora_balance",
    "lora_compact",
    "lora_dense",
    "lora_merge",
    "lora_scale",
    "lora_sum",
    "lora_svd",
    "lora_task_features",
    "orthogonalize",
    "sftm",
    "sftm_factors",
    "sti",
    "task_arithmetic",
    "task_features",
    "ties",
    "trim_magnitude",
    "truncated_svd",
    "tsv_m",
    "tsv_m_factors",
    "use_randomized",
]
