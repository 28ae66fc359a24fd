import dataclasses
import pickle
import subprocess
import sys
from typing import ClassVar

import pytest
import torch

from lightning_merge import METHODS, SFTM, TIES, TSVM, Average, TaskArithmetic, get_method
from lightning_merge import functional as F
from lightning_merge.functional._checks import resolve_rank
from lightning_merge.functional.lora import LowRankUpdate, lora_dense, lora_merge, lora_sum
from lightning_merge.functional.svd import svd_merge_cost


def test_registry_names_every_method_with_a_reference():
    assert sorted(METHODS) == ["average", "sftm", "task_arithmetic", "ties", "tsv_m"]
    for cls in METHODS.values():
        assert cls.reference_url.startswith("https://arxiv.org/abs/")


def test_get_method_builds_validated_picklable_objects():
    method = get_method("tsv_m", rank=0.125, scaling=0.8)
    assert method == TSVM(rank=0.125, scaling=0.8)
    assert pickle.loads(pickle.dumps(method)) == method
    assert get_method(method.name, **method.options()) == method
    assert get_method(method, scaling=0.5).scaling == 0.5
    assert TaskArithmetic().scaling == 0.3


@pytest.mark.parametrize(
    ("name", "options", "error", "match"),
    [
        ("tsvm", {}, ValueError, "`method`.*'tsvm'"),
        ("tsv_m", {"density": 0.5}, ValueError, r"unknown \['density'\]"),
        ("tsv_m", {"rank": 0}, ValueError, "`rank`.*got 0"),
        ("ties", {"density": 1.5}, ValueError, "`density`.*1.5"),
        ("sftm", {"basis": "svd"}, ValueError, "`basis`"),
        ("sftm", {"rcond": -1.0}, ValueError, "`rcond`"),
        ("sftm", {"fit": "outputs"}, ValueError, r"`fit` to be one of \['response', 'mapping'\]"),
        ("average", {"weights": [1.0, float("inf")]}, ValueError, "`weights`"),
    ],
)
def test_get_method_rejects_bad_options(name, options, error, match):
    with pytest.raises(error, match=match):
        get_method(name, **options)


def test_method_objects_delegate_to_the_functional_core():
    deltas = [torch.randn(12, 10, dtype=torch.float64) for _ in range(3)]
    assert torch.equal(TSVM(rank=2).merge(deltas), F.tsv_m(deltas, rank=2))
    assert torch.equal(SFTM(basis="orthogonal").merge(deltas), F.sftm(deltas, basis="orthogonal"))
    assert torch.equal(SFTM(fit="mapping").merge(deltas), F.sftm(deltas, fit="mapping"))
    assert not torch.equal(SFTM(fit="mapping").merge(deltas), SFTM().merge(deltas))
    assert torch.equal(TIES(density=0.3).merge(deltas), F.ties(deltas, density=0.3))


def test_call_merges_base_and_finetuned_in_base_dtype():
    base = torch.randn(16, 8).bfloat16()
    finetuned = [base + 0.01 * torch.randn(16, 8).bfloat16() for _ in range(3)]
    merged = SFTM()(base, finetuned)
    assert merged.dtype == torch.bfloat16
    deltas = [f.float() - base.float() for f in finetuned]  # differences in float32, not bf16
    assert torch.equal(merged, (base.float() + F.sftm(deltas)).bfloat16())


@pytest.mark.parametrize("name", ["average", "task_arithmetic"])
def test_linear_methods_accumulate_without_a_task_buffer_and_agree_with_the_core(name):
    base = torch.randn(40, 30)
    finetuned = [base + 1e-3 * torch.randn(40, 30) for _ in range(5)]
    method = get_method(name, weights=[1.0, -0.5, 2.0, 0.0, 1.0], scaling=0.7)
    expected = base.double() + getattr(F, name)([f.double() - base.double() for f in finetuned], scaling=0.7,
                                                weights=[1.0, -0.5, 2.0, 0.0, 1.0])
    assert torch.allclose(method(base, finetuned).double(), expected, rtol=0, atol=1e-6)
    bad = [*finetuned[:2], torch.full((40, 30), float("nan"))]
    with pytest.raises(ValueError, match=r"`task_vectors\[2\]` contain NaN or Inf"):
        get_method(name)(base, bad)


def test_cost_orders_parameters_by_svd_work():
    method = TSVM()
    assert method.cost((3072, 768), 8) > method.cost((768, 768), 8) > method.cost((768,), 8)


@pytest.mark.parametrize(
    ("method", "shape", "num_tasks", "expected"),
    [  # the estimates the shard stage has always balanced (randomized and exact SVD branches, and non-matrices)
        (TSVM(), (768, 768), 8, 16873684992.0),
        (TSVM(), (3072, 768), 8, 37597741056.0),
        (SFTM(), (768, 3072), 2, 25669140480.0),  # the Gram route: per-task SVD count / 1.8
        (TSVM(), (256, 256), 4, 1207959552.0),
        (TSVM(rank=16), (4096, 4096), 8, 42186309632.0),
        (SFTM(rank=0.5), (64, 64), 3, 29491200.0),
        (TSVM(), (768,), 8, 6144.0),
        (TSVM(), (), 3, 3.0),
        (TIES(), (10, 3, 3, 3), 2, 540.0),
        (TaskArithmetic(), (768, 768), 8, 4718592.0),
    ],
)
def test_cost_is_the_one_estimate_of_the_svd_module(method, shape, num_tasks, expected):
    assert method.cost(shape, num_tasks) == expected
    if len(shape) == 2 and isinstance(method, TSVM | SFTM):
        k = resolve_rank(method.rank, min(shape), num_tasks)
        assert method.cost(shape, num_tasks) == svd_merge_cost(*shape, k, num_tasks)


# ------------------------------------------------------------------------------------------------ low-rank form
def _updates(m=20, n=16, ranks=(3, 5, 2)):
    g = torch.Generator().manual_seed(0)
    f64 = torch.float64
    return [
        LowRankUpdate(torch.randn(m, r, generator=g, dtype=f64), torch.randn(r, n, generator=g, dtype=f64), 1.5 / r)
        for r in ranks
    ]


def test_methods_declare_whether_they_merge_low_rank_updates():
    assert {name: cls.merges_low_rank() for name, cls in METHODS.items()} == {
        "average": True, "sftm": True, "task_arithmetic": True, "ties": False, "tsv_m": True,
    }
    for name in ("average", "sftm", "task_arithmetic", "tsv_m"):
        get_method(name).check_low_rank()


@pytest.mark.parametrize(
    ("method", "coefficient"), [(Average(scaling=0.6), 0.6 / 3), (TaskArithmetic(scaling=0.6), 0.6)]
)
def test_linear_methods_merge_low_rank_updates_as_exact_sums(method, coefficient):
    updates, weights = _updates(), (1.0, -0.5, 2.0)
    for options in ({}, {"weights": weights}):
        chosen = get_method(method, **options)
        scaled = [u._replace(scale=u.scale * w) for u, w in zip(updates, chosen.weights or (1.0,) * 3, strict=True)]
        merged = chosen.merge_low_rank(updates)
        assert torch.equal(merged.B @ merged.A, (out := lora_sum(scaled, scaling=coefficient)).B @ out.A)
        dense = chosen.merge(torch.stack([lora_dense(u) for u in updates]))
        assert torch.allclose(merged.B @ merged.A, dense, rtol=0, atol=1e-12) and merged.scale == 1.0


@pytest.mark.parametrize("method", [TSVM(rank=2, scaling=0.7), SFTM(basis="orthogonal"), SFTM(weights=(1.0, 0.5, 2.0))])
@pytest.mark.parametrize("compact", [False, True])
def test_svd_methods_merge_low_rank_updates_with_their_factors(method, compact):
    updates = _updates()
    weights = method.weights or (1.0,) * 3
    scaled = [u._replace(scale=u.scale * w) for u, w in zip(updates, weights, strict=True)]
    merged = method.merge_low_rank(updates, compact=compact)
    expected = lora_merge(scaled, method.factors, rank=method.rank, scaling=method.scaling, compact=compact)
    assert torch.equal(merged.B, expected.B) and torch.equal(merged.A, expected.A)
    dense = get_method(method, solver="exact").merge(torch.stack([lora_dense(u) for u in updates]))
    assert float((merged.B @ merged.A - dense).norm() / dense.norm()) < 1e-8


def test_methods_without_a_low_rank_form_refuse_before_any_work():
    able = r"\['average', 'sftm', 'task_arithmetic', 'tsv_m'\]"
    with pytest.raises(ValueError, match=rf"Expected argument `method` to be one of {able} .*but got 'ties'"):
        TIES().check_low_rank()
    with pytest.raises(ValueError, match="'ties' has no low-rank form"):
        TIES().merge_low_rank(_updates())
    with pytest.raises(ValueError, match="`weights`.*one entry per task"):
        TSVM(weights=(1.0,)).merge_low_rank(_updates())


def test_a_new_method_declares_its_low_rank_form_in_one_place():
    @dataclasses.dataclass(frozen=True)
    class Renamed(TaskArithmetic):  # a subclass inherits the capability
        name: ClassVar[str] = "renamed"

    @dataclasses.dataclass(frozen=True)
    class Dense(TIES):
        def merge_low_rank(self, updates, *, compact=False):
            return lora_sum(updates, scaling=-self.scaling, compact=compact)

    assert Renamed.merges_low_rank() and Dense.merges_low_rank() and not TIES.merges_low_rank()
    merged = Dense(scaling=2.0).merge_low_rank(_updates(ranks=(2,)))
    assert torch.allclose(merged.B @ merged.A, -2.0 * lora_dense(_updates(ranks=(2,))[0]))


def test_core_imports_without_lightning():
    code = (
        "import sys\n"
        "for name in ('lightning', 'pytorch_lightning', 'lightning.pytorch'): sys.modules[name] = None\n"
        "import torch, lightning_merge.functional as F, lightning_merge.methods\n"
        "print(F.tsv_m([torch.eye(3)]).shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "torch.Size([3, 3])" in out.stdout


def test_embeddings_average_merges_vocabulary_sized_matrices_as_other_parameters():
    g = torch.Generator().manual_seed(0)
    vocab = [torch.randn(16384, 32, generator=g, dtype=torch.float64) for _ in range(3)]
    square = [torch.randn(40, 30, generator=g, dtype=torch.float64) for _ in range(3)]
    for cls in (TSVM, SFTM):
        averaged, kept = cls(scaling=0.5), cls(embeddings="matrix", scaling=0.5)  # "average" is the default
        assert torch.allclose(averaged.merge(vocab), 0.5 * sum(vocab) / 3, atol=1e-12, rtol=0)
        assert torch.equal(kept.merge(vocab), kept.merge_matrix(vocab))  # "matrix": by its singular features
        assert not torch.allclose(kept.merge(vocab), averaged.merge(vocab))
        assert torch.equal(averaged.merge(square), kept.merge(square))  # only vocabulary-sized ones change
        assert averaged.cost((16384, 32), 3) == get_method("average").cost((16384, 32), 3) < kept.cost((16384, 32), 3)
    with pytest.raises(ValueError, match=r"`embeddings` to be one of \['matrix', 'average'\]"):
        TSVM(embeddings="mean")
    with pytest.raises(ValueError, match="at least one tensor"):
        TSVM().merge([])  # the embeddings rule looks at the first input: bad inputs keep their own errors
    with pytest.raises(TypeError, match=r"`task_vectors\[0\]` to be a torch.Tensor"):
        SFTM().merge([None])


@pytest.mark.parametrize(("shape", "expected"), [((30522, 384), True), ((384, 30522), True), ((128256, 4096), True),
                                                 ((32000, 4096), True), ((4096, 32000), True), ((32000, 5120), True),
                                                 ((16384, 4096), False), ((18176, 4544), False), ((3072, 768), False),
                                                 ((14336, 4096), False), ((512, 384), False),
                                                 ((16383, 8), False), ((30522,), False), ((0, 30522), False)])
def test_vocabulary_sized(shape, expected):
    from lightning_merge.methods import vocabulary_sized

    assert vocabulary_sized(shape) is expected
