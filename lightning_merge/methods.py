"""Typed, validated, picklable merge-method objects and the plain registry that names them.

A method object carries its options; ``method.merge(task_vectors)`` returns the scaled merged task vector of one
parameter and ``method(base, finetuned)`` the merged parameter. A method that can merge LoRA factors without forming
``m x n`` matrices implements :meth:`MergeMethod.merge_low_rank` (the linear methods and the SVD methods do; TIES
does not, and refuses). The callback, the engine and the command line name methods by string through
:func:`get_method`, so ``LightningCLI`` YAML can configure them.

Example:
    >>> method = get_method("tsv_m", rank=0.125)
    >>> method
    TSVM(scaling=1.0, weights=None, rank=0.125, solver='auto', embeddings='average')
    >>> base = torch.zeros(4, 4)
    >>> method(base, [base + torch.eye(4), base - torch.eye(4)]).shape
    torch.Size([4, 4])
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from lightning_merge import functional as F
from lightning_merge.functional._checks import (
    Rank,
    check_choice,
    check_density,
    check_rank,
    check_rcond,
    check_scaling,
    check_weights,
    compute_dtype,
    finite_as,
    numel,
    resolve_rank,
)
from lightning_merge.functional.lora import LowRankUpdate, lora_merge, lora_sum
from lightning_merge.functional.merges import Basis, Factors, Fit, TaskVectors, linear_merge
from lightning_merge.functional.svd import SOLVERS, Solver, svd_merge_cost

Embeddings = Literal["matrix", "average"]
VOCABULARY_ASPECT, VOCABULARY_ROWS = 6, 16384


def vocabulary_sized(shape: tuple[int, ...]) -> bool:
    """Whether a parameter of ``shape`` is vocabulary-sized: 2-D, its long side at least ``6x`` its short side and at
    least 16384 (a 30522 x 384 word embedding, a 32000 x 4096 or 128256 x 4096 embedding or output head; not a
    3072 x 768, 16384 x 4096 or 14336 x 4096 MLP weight, nor a 512 x 384 position embedding).

    **(choice)** ``6x`` sits above the MLP aspects of the models in use (4x for GPT/BERT-style MLPs, 2.7-3.5x for
    gated ones, 4x for Falcon's 18176 x 4544) and below the vocabularies' (7.8x for Llama-2-7B's 32000 x 4096, 79x
    for BERT-small's). A vocabulary under 6x its width (Llama-2-70B's 32000 x 8192) is merged as a matrix: correct,
    only slower.

    Example:
        >>> vocabulary_sized((30522, 384)), vocabulary_sized((3072, 768)), vocabulary_sized((512, 384))
        (True, False, False)
    """
    if len(shape) != 2 or min(shape) == 0:
        return False
    return max(shape) >= VOCABULARY_ASPECT * min(shape) and max(shape) >= VOCABULARY_ROWS


@dataclasses.dataclass(frozen=True)
class MergeMethod(ABC):
    """Base class: ``scaling`` is the coefficient ``lam`` of ``W = W0 + lam * M``; ``weights`` scale each task."""

    name: ClassVar[str]
    reference_url: ClassVar[str]
    scaling: float = 1.0
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        check_scaling(self.scaling)
        if self.weights is not None:
            check_weights(self.weights)
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))

    @abstractmethod
    def merge(self, task_vectors: TaskVectors) -> Tensor:
        """The merged task vector ``scaling * M`` of one parameter, in the dtype of the task vectors."""

    def options(self) -> dict[str, Any]:
        """The constructor arguments, as primitives (for logs, records and ``get_method(name, **options)``)."""
        return dataclasses.asdict(self)

    def with_scaling(self, scaling: float) -> MergeMethod:
        """The same method with another scaling coefficient."""
        return dataclasses.replace(self, scaling=scaling)

    def __call__(self, base: Tensor, finetuned: Sequence[Tensor]) -> Tensor:
        """The merged parameter ``W0 + scaling * M`` from the base and the fine-tuned tensors, in the base's dtype."""
        w0, finetuned = self._inputs(base, finetuned)
        return self._merged(w0, finetuned, base.dtype)

    def merged_delta(self, base: Tensor, finetuned: Sequence[Tensor]) -> Tensor:
        """``scaling * M`` from the base and the fine-tuned tensors, in float32 (float64 for float64 inputs).

        Differences are taken in that dtype, so bf16 weights lose nothing to cancellation. With ``scaling`` 1 this is
        the ``M`` of a scaling search (:func:`lightning_merge.engine.task_matrices`).
        """
        return self._merged_delta(*self._inputs(base, finetuned))

    def _inputs(self, base: Tensor, finetuned: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """The base in the compute dtype and the fine-tuned tensors as a list, checked."""
        if not isinstance(base, Tensor):
            raise TypeError(f"Expected argument `base` to be a torch.Tensor, but got {type(base).__name__}.")
        finetuned = list(finetuned)
        for t, f in enumerate(finetuned):
            if not isinstance(f, Tensor) or f.shape != base.shape:
                raise ValueError(
                    f"Expected `finetuned[{t}]` to be a tensor of the base's shape {tuple(base.shape)}, but got"
                    f" {tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__}."
                )
        if not finetuned:
            raise ValueError("Expected argument `finetuned` to hold at least one tensor, but got an empty sequence.")
        return base.to(compute_dtype(base.dtype) if base.is_floating_point() else torch.float32), finetuned

    def _merged(self, w0: Tensor, finetuned: list[Tensor], dtype: torch.dtype) -> Tensor:
        return finite_as(w0 + self._merged_delta(w0, finetuned), dtype)

    def _merged_delta(self, w0: Tensor, finetuned: list[Tensor]) -> Tensor:
        # The differences go into one (T, *shape) buffer, written in place: no list of copies, then a stack.
        deltas = torch.empty((len(finetuned), *w0.shape), dtype=w0.dtype, device=w0.device)
        for t, f in enumerate(finetuned):
            torch.sub(f.to(w0.dtype), w0, out=deltas[t])
        return self.merge(deltas)

    def cost(self, shape: Sequence[int], num_tasks: int) -> float:
        """Estimated floating-point operations to merge one parameter (used to balance work across ranks)."""
        return float(numel(shape) * num_tasks)

    def merge_low_rank(self, updates: Sequence[LowRankUpdate], *, compact: bool = False) -> LowRankUpdate:
        """The merged update ``scaling * M`` of ``T`` LoRA updates of one matrix, as factors (scale 1), never
        forming an ``m x n`` matrix (METHODS.md, "LoRA task matrices"); ``weights`` multiply each update's scale.

        A method declares that it merges LoRA factors by implementing this (see :meth:`merges_low_rank`); this
        default refuses. ``compact``: see :func:`~lightning_merge.functional.lora.lora_merge`.

        Raises:
            ValueError: the method has no low-rank form, or ``weights`` has not one entry per update.

        Example:
            >>> update = F.LowRankUpdate(torch.ones(4, 1), torch.ones(1, 3), 2.0)
            >>> merged = Average().merge_low_rank([update, update])
            >>> torch.allclose(merged.B @ merged.A, torch.full((4, 3), 2.0)), TIES.merges_low_rank()
            (True, False)
        """
        raise ValueError(self._low_rank_refusal())

    @classmethod
    def merges_low_rank(cls) -> bool:
        """Whether the method merges LoRA factors: whether it implements :meth:`merge_low_rank`."""
        return cls.merge_low_rank is not MergeMethod.merge_low_rank

    def check_low_rank(self) -> None:
        """Refuse, before any work, a method that cannot merge LoRA factors (:meth:`merge_low_rank`).

        Raises:
            ValueError: naming the method and the methods that can.
        """
        if not self.merges_low_rank():
            raise ValueError(self._low_rank_refusal())

    def _low_rank_refusal(self) -> str:
        able = sorted(name for name, cls in METHODS.items() if cls.merges_low_rank())
        return (
            f"Expected argument `method` to be one of {able} for LoRA adapters, but got {self.name!r}. HINT:"
            f" {self.name!r} has no low-rank form (it does not implement `merge_low_rank`); merge the models with"
            " the adapters merged in instead."
        )

    def _weighted(self, updates: Sequence[LowRankUpdate]) -> list[LowRankUpdate]:
        """The updates with ``weights`` folded into their scales, checked (one weight per update)."""
        weights = self.weights or (1.0,) * len(updates)
        check_weights(weights, len(updates))
        return [update._replace(scale=update.scale * w) for update, w in zip(updates, weights, strict=True)]


@dataclasses.dataclass(frozen=True)
class _LinearMethod(MergeMethod):
    """A merge linear in the task vectors, ``M = c(T) * sum_t w_t D_t``: computed task by task with no
    ``(T, *shape)`` buffer, and the merged parameter in one cache-blocked pass (see
    :func:`lightning_merge.functional.sum_of_differences`)."""

    def _coefficient(self, num_tasks: int) -> float:
        """``c(T)`` of ``scaling * M = c(T) * sum_t w_t D_t``: ``scaling`` (task arithmetic) or ``scaling / T``."""
        return self.scaling

    def merge_low_rank(self, updates: Sequence[LowRankUpdate], *, compact: bool = False) -> LowRankUpdate:
        """``c(T) * sum_t w_t D_t`` exactly, as factors of rank at most ``sum_t r_t``
        (:func:`~lightning_merge.functional.lora.lora_sum`)."""
        return lora_sum(self._weighted(updates), scaling=self._coefficient(len(updates)), compact=compact)

    def _merged_delta(self, w0: Tensor, finetuned: list[Tensor]) -> Tensor:
        return F.sum_of_differences(w0, finetuned, self.weights, scaling=self._coefficient(len(finetuned)))

    def _merged(self, w0: Tensor, finetuned: list[Tensor], dtype: torch.dtype) -> Tensor:
        coefficient = self._coefficient(len(finetuned))
        merged, finite = linear_merge(w0, finetuned, self.weights, coefficient, add_base=True)
        # a finite result in the output dtype needs no second pass to check it
        return merged if finite and merged.dtype == dtype else finite_as(merged, dtype)


@dataclasses.dataclass(frozen=True)
class Average(_LinearMethod):
    """``M = mean_t D_t``."""

    name: ClassVar[str] = "average"
    reference_url: ClassVar[str] = "https://arxiv.org/abs/2203.05482"

    def merge(self, task_vectors: TaskVectors) -> Tensor:
        return F.average(task_vectors, scaling=self.scaling, weights=self.weights)

    def _coefficient(self, num_tasks: int) -> float:
        return self.scaling / num_tasks


@dataclasses.dataclass(frozen=True)
class TaskArithmetic(_LinearMethod):
    """Task arithmetic, ``M = sum_t D_t`` (Ilharco et al., ICLR 2023); ``scaling`` defaults to 0.3."""

    name: ClassVar[str] = "task_arithmetic"
    reference_url: ClassVar[str] = "https://arxiv.org/abs/2212.04089"
    scaling: float = 0.3

    def merge(self, task_vectors: TaskVectors) -> Tensor:
        return F.task_arithmetic(task_vectors, scaling=self.scaling, weights=self.weights)


@dataclasses.dataclass(frozen=True)
class TIES(MergeMethod):
    """TIES-Merging with per-tensor trimming to ``density`` (Yadav et al., NeurIPS 2023)."""

    name: ClassVar[str] = "ties"
    reference_url: ClassVar[str] = "https://arxiv.org/abs/2306.01708"
    density: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_density(self.density)

    def merge(self, task_vectors: TaskVectors) -> Tensor:
        return F.ties(task_vectors, density=self.density, scaling=self.scaling, weights=self.weights)


@dataclasses.dataclass(frozen=True)
class SVDMethod(MergeMethod):
    """Shared options of the merges on singular features: ``rank`` per task, the SVD ``solver``, and how
    vocabulary-sized matrices are merged (``embeddings``).

    ``embeddings="average"`` (the default, **a choice**) merges vocabulary-sized matrices (token embeddings, untied
    output heads: a 2-D parameter whose long side is at least ``6x`` its short side and at least 16384, see
    :func:`vocabulary_sized`) as METHODS.md's other parameters, ``M = mean_t D_t``; ``embeddings="matrix"`` merges
    them by their singular features like every other matrix parameter. A fine-tune changes only the rows of the
    tokens it saw, so such a task matrix is sparse in rows rather than low-rank, and its SVD is the largest single
    cost of a transformer's merge. Measured on the real-transformer job (all-MiniLM-L6-v2, 4 text tasks, its 30522 x
    384 word embedding): the same mean normalized accuracy within one test example (TSV-M 0.9852 both ways at the
    validation-chosen ``lam``, 0.9755 against 0.9740 at ``lam = 1``; SFTM 0.9791 against 0.9803) for 22-27% less
    time computing the merged matrices (TSV-M 4.0 s against 5.2 s, SFTM 3.5 s against 4.8 s). The factored LoRA
    path is unaffected (an adapter's update is low-rank).
    """

    rank: Rank = None
    solver: Solver = "auto"
    embeddings: Embeddings = "average"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rank(self.rank)
        check_choice("solver", self.solver, SOLVERS)
        check_choice("embeddings", self.embeddings, ("matrix", "average"))

    def merge(self, task_vectors: TaskVectors) -> Tensor:
        first = task_vectors[0] if len(task_vectors) else None  # bad inputs are the method's own to refuse
        if self.embeddings == "average" and isinstance(first, Tensor) and vocabulary_sized(tuple(first.shape)):
            return F.average(task_vectors, scaling=self.scaling, weights=self.weights)
        return self.merge_matrix(task_vectors)

    @abstractmethod
    def merge_matrix(self, task_vectors: TaskVectors) -> Tensor:
        """The method's own merge (matrices by their singular features, other parameters averaged)."""

    @abstractmethod
    def factors(self, U: Tensor, s: Tensor, V: Tensor) -> Factors:
        """``(L, R)`` with ``M = L R^T`` from concatenated task features (the step shared with LoRA merging)."""

    def merge_low_rank(self, updates: Sequence[LowRankUpdate], *, compact: bool = False) -> LowRankUpdate:
        """The method on factors through its :meth:`factors` step and ``rank`` budget
        (:func:`~lightning_merge.functional.lora.lora_merge`; the ``solver`` option is moot: the small SVDs are
        exact)."""
        return lora_merge(self._weighted(updates), self.factors, rank=self.rank, scaling=self.scaling, compact=compact)

    def cost(self, shape: Sequence[int], num_tasks: int) -> float:
        """The SVD merge's estimate (:func:`~lightning_merge.functional.svd.svd_merge_cost`) for a matrix, the
        average's for other parameters."""
        if len(shape) != 2 or (self.embeddings == "average" and vocabulary_sized(tuple(shape))):
            return super().cost(shape, num_tasks)
        m, n = shape
        return svd_merge_cost(m, n, resolve_rank(self.rank, min(m, n), num_tasks), num_tasks)


@dataclasses.dataclass(frozen=True)
class TSVM(SVDMethod):
    """TSV-M, Task Singular Vectors Merge (Gargiulo et al., CVPR 2025)."""

    name: ClassVar[str] = "tsv_m"
    reference_url: ClassVar[str] = "https://arxiv.org/abs/2412.00081"

    def merge_matrix(self, task_vectors: TaskVectors) -> Tensor:
        return F.tsv_m(task_vectors, rank=self.rank, scaling=self.scaling, solver=self.solver, weights=self.weights)

    def factors(self, U: Tensor, s: Tensor, V: Tensor) -> Factors:
        return F.tsv_m_factors(U, s, V)


@dataclasses.dataclass(frozen=True)
class SFTM(SVDMethod):
    """SFTM, Superpose Features from Task Matrix (Qiu, Wu, Yao, arXiv:2502.10698; EMNLP 2025).

    ``basis``: the superposed features (``"features"``, the paper) or TSV-M's orthogonalized ones (``"orthogonal"``,
    this project's extension). ``fit``: the coefficients keep each kept feature's own response ``u^T M v = s``
    (``"response"``, the paper's constraints, the default) or its whole mapping in least squares,
    ``min sum ||M v - s u||^2`` (``"mapping"``, METHODS.md's second reading). See
    :func:`lightning_merge.functional.sftm_factors`.

    Why ``fit="response"`` stays the default: on the real-transformer job (all-MiniLM-L6-v2 fully fine-tuned on 4
    text tasks, ``examples/text_study.py``) the mapping fit was worse at ``lam = 1`` (mean normalized accuracy
    0.957 against 0.980 in the features basis, 0.953 against 0.989 in the orthogonal one) and not better at the
    validation-chosen ``lam`` in the features basis (0.980 against 0.980); in the orthogonal basis it was the best
    merge at its chosen ``lam`` (0.999 at ``lam = 2.5``, the grid's edge, against 0.989 at ``lam = 1``), but only
    after a scaling search, and its best ``lam`` moved up to 2-2.5 where the response fit's is 1.
    """

    name: ClassVar[str] = "sftm"
    reference_url: ClassVar[str] = "https://arxiv.org/abs/2502.10698"
    basis: Basis = "features"
    rcond: float | None = None
    fit: Fit = "response"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("basis", self.basis, ("features", "orthogonal"))
        check_choice("fit", self.fit, ("response", "mapping"))
        if self.rcond is not None:
            check_rcond(self.rcond)

    def merge_matrix(self, task_vectors: TaskVectors) -> Tensor:
        return F.sftm(
            task_vectors,
            rank=self.rank,
            scaling=self.scaling,
            basis=self.basis,
            rcond=self.rcond,
            solver=self.solver,
            weights=self.weights,
            fit=self.fit,
        )

    def factors(self, U: Tensor, s: Tensor, V: Tensor) -> Factors:
        return F.sftm_factors(U, s, V, basis=self.basis, rcond=self.rcond, fit=self.fit)


METHODS: dict[str, type[MergeMethod]] = {
    cls.name: cls for cls in (Average, TaskArithmetic, TIES, TSVM, SFTM)
}


def get_method(method: str | MergeMethod, **options: Any) -> MergeMethod:
    """A method object from its registry name and options (a method object is returned as is, options applied).

    Raises:
        ValueError: an unknown name, or an option the method does not take.
    """
    if isinstance(method, MergeMethod):
        return dataclasses.replace(method, **options) if options else method
    if method not in METHODS:
        raise ValueError(f"Expected argument `method` to be one of {sorted(METHODS)}, but got {method!r}.")
    cls = METHODS[method]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"Method {method!r} takes the options {sorted(known)}, but got unknown {unknown}.")
    return cls(**options)
