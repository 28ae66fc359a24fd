import pickle
import subprocess
import sys

import pytest
import torch

from lightning_merge import METHODS, SFTM, TIES, TSVM, TaskArithmetic, get_method
from lightning_merge import functional as F


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


def test_core_imports_without_lightning():
    code = (
        "import sys\n"
        "for name in ('lightning', 'pytorch_lightning', 'lightning.pytorch'): sys.modules[name] = None\n"
        "import torch, lightning_merge.functional as F, lightning_merge.methods\n"
        "print(F.tsv_m([torch.eye(3)]).shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "torch.Size([3, 3])" in out.stdout
