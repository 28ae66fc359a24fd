"""mergekit YAML configs through ``lightning-merge --config`` (issue 19, part 4): the output matches an independent
float64 re-implementation of mergekit 0.1.5's semantics (``merge_methods/linear.py``,
``generalized_task_arithmetic.py``, ``sparsify.magnitude``) where the semantics match; what has no equivalent is a
one-line error naming the field. mergekit itself is not needed (README, "From mergekit", records the check against
it)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from lightning_merge.cli import main
from lightning_merge.io import open_source
from tests import reference

SHAPES = {"w": (6, 4), "v": (8, 2), "b": (6,)}  # numel even: density 0.5 keeps the same count under floor and ceil


@pytest.fixture
def folder(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(shape, generator=g) for k, shape in SHAPES.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    for t in range(3):
        save_file({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()},
                  str(tmp_path / f"t{t}.safetensors"))
    return tmp_path


def config(folder, method, models, **top):
    """A mergekit config beside the checkpoints; ``models`` maps a file stem to its parameters (or None)."""
    entries = [{"model": f"{m}.safetensors", **({"parameters": p} if p is not None else {})} for m, p in models]
    (folder / "mk.yaml").write_text(yaml.safe_dump({"merge_method": method, "models": entries, **top}))
    return str(folder / "mk.yaml")


def run(folder, path, *flags) -> dict[str, np.ndarray]:
    assert main(["--config", path, "--output", str(folder / "out"), "--quiet", *flags]) == 0
    merged = open_source(folder / "out")
    return {k: merged.get_tensor(k).double().numpy() for k in merged.keys()}


def mergekit_reference(folder, method, stems, weights, density=1.0, normalize=False, lam=1.0, base="base"):
    """mergekit's merge of one key at a time, in float64, written from its source (not from lightning_merge)."""
    src = {s: open_source(folder / f"{s}.safetensors") for s in {base, *stems}}
    out = {}
    for key in SHAPES:
        w0 = src[base].get_tensor(key).double().numpy()
        tensors = [src[s].get_tensor(key).double().numpy() for s in stems]
        w = np.asarray(weights, dtype=np.float64).reshape(-1, *([1] * w0.ndim))
        if method == "linear":  # sum_t w_t W_t / sum_t w_t; the base is not an input
            out[key] = (w * np.stack(tensors)).sum(0) / (w.sum() if normalize else 1.0)
            continue
        deltas = []
        for d in (t - w0 for t in tensors):
            if method == "ties" and density < 1:  # sparsify.magnitude: the top max(1, floor(density * n)) by |d|
                keep = max(1, int(density * d.size))
                mask = np.zeros(d.size)
                mask[np.argsort(-np.abs(d.ravel()), kind="stable")[:keep]] = 1
                d = d * mask.reshape(d.shape)
            deltas.append(d)
        weighted = np.stack(deltas) * w
        if method == "ties":  # get_mask(method="sum"): the majority sign is + where the sum is >= 0
            majority = np.where(weighted.sum(0) >= 0, 1.0, -1.0)
            mask = np.sign(weighted) == majority
            mixed, divisor = (weighted * mask).sum(0), (w * mask).sum(0)
            divisor[divisor == 0] = 1
        else:
            mixed, divisor = weighted.sum(0), w.sum(0)
            divisor[np.abs(divisor) < 1e-8] = 1
        out[key] = w0 + lam * (mixed / divisor if normalize else mixed)
    return out


def assert_close(got, want):
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_matches_mergekit(folder, normalize):
    weights = [0.5, 1.0, -0.25]
    path = config(folder, "task_arithmetic", [("base", None), *((f"t{t}", {"weight": w}) for t, w in
                                                                 enumerate(weights))],
                  base_model="base.safetensors", parameters={"lambda": 0.7, "normalize": normalize, "int8_mask": True})
    want = mergekit_reference(folder, "task_arithmetic", ["t0", "t1", "t2"], weights, normalize=normalize, lam=0.7)
    assert_close(run(folder, path), want)
    record = json.loads((folder / "out" / "merge_record.json").read_text())
    assert record["method"] == "task_arithmetic" and record["options"]["weights"] == weights


def test_ties_matches_mergekit_with_equal_weights(folder):
    path = config(folder, "ties", [("base", None), ("t0", {"density": 0.5}), ("t1", {"density": 0.5}),
                                   ("t2", {"density": 0.5})],
                  base_model="base.safetensors", parameters={"weight": 0.8, "lambda": 1.2}, dtype="float32")
    want = mergekit_reference(folder, "ties", ["t0", "t1", "t2"], [0.8] * 3, density=0.5, normalize=True, lam=1.2)
    assert_close(run(folder, path), want)


def test_ties_density_defaults_to_mergekits_one_not_ours(folder):
    path = config(folder, "ties", [("t0", {"weight": 1}), ("t1", {"weight": 1})], base_model="base.safetensors")
    got = run(folder, path)
    assert json.loads((folder / "out" / "merge_record.json").read_text())["options"]["density"] == 1.0
    assert_close(got, mergekit_reference(folder, "ties", ["t0", "t1"], [1, 1], density=1.0, normalize=True))


@pytest.mark.parametrize("base_model", [None, "base.safetensors"])
def test_linear_matches_mergekit_with_or_without_a_base(folder, base_model):
    weights = [1.0, 2.0, 3.0]
    path = config(folder, "linear", [(f"t{t}", {"weight": w}) for t, w in enumerate(weights)],
                  **({"base_model": base_model} if base_model else {}))
    want = mergekit_reference(folder, "linear", ["t0", "t1", "t2"], weights, normalize=True)
    assert_close(run(folder, path), want)


def test_tsv_m_by_its_name_with_our_options(folder):
    path = config(folder, "tsv_m", [("t0", None), ("t1", None)], base_model="base.safetensors",
                  parameters={"rank": 1, "lambda": 0.5})
    got = run(folder, path)
    src = {s: open_source(folder / f"{s}.safetensors") for s in ("base", "t0", "t1")}
    for key in SHAPES:
        w0 = src["base"].get_tensor(key).double().numpy()
        deltas = [src[t].get_tensor(key).double().numpy() - w0 for t in ("t0", "t1")]
        merged = reference.tsv_m(deltas, 1) if w0.ndim == 2 else np.mean(deltas, 0)
        np.testing.assert_allclose(got[key], w0 + 0.5 * merged, rtol=1e-5, atol=1e-6, err_msg=key)


def test_print_config_shows_the_translation(folder, capsys):
    path = config(folder, "ties", [("t0", None), ("t1", None)], base_model="base.safetensors",
                  parameters={"density": 0.5, "weight": 1.0}, out_dtype="bfloat16")
    assert main(["--config", path, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["method"] == "ties" and printed["density"] == 0.5 and printed["scaling"] == 1.0
    assert printed["dtype"] == "bfloat16" and printed["base"] == str(folder / "base.safetensors")
    assert printed["finetuned"] == [str(folder / "t0.safetensors"), str(folder / "t1.safetensors")]


BASE = "base.safetensors"
TWO = [("t0", {"weight": 1.0}), ("t1", {"weight": 1.0})]


@pytest.mark.parametrize(
    ("method", "models", "top", "field"),
    [
        ("slerp", TWO, {"base_model": BASE}, "`merge_method`"),
        ("ties", [("t0", {"weight": 1.0}), ("t1", {"weight": 0.5})], {"base_model": BASE}, "`weight`: expected the"
         " same value for every model"),
        ("ties", [("t0", {"weight": 1, "density": 0.5}), ("t1", {"weight": 1, "density": 0.3})], {"base_model": BASE},
         "`density`: expected the same value"),
        ("ties", TWO, {"base_model": BASE, "parameters": {"normalize": False}}, "`parameters.normalize`"),
        ("ties", TWO, {}, "`base_model`: expected a path"),
        ("ties", [("t0", {"weight": [{"filter": "mlp", "value": 1}]}), ("t1", {"weight": 1})], {"base_model": BASE},
         "`models[0].parameters.weight`: expected a finite number (per-layer gradients"),
        ("ties", TWO, {"base_model": BASE, "parameters": {"rescale": True}}, "`parameters.rescale`"),
        ("task_arithmetic", [("t0", {"weight": 1.0}), ("t1", None)], {"base_model": BASE},
         "`models[1].parameters.weight`: expected a number: task_arithmetic needs"),
        ("task_arithmetic", [("t0", {"weight": "x"}), ("t1", {"weight": 1})], {"base_model": BASE},
         "`models[0].parameters.weight`: expected a finite number"),
        ("task_arithmetic", [("t0", {"weight": 1, "lambda": 2}), ("t1", {"weight": 1})], {"base_model": BASE},
         "`models[0].parameters.lambda`: expected no per-model value"),
        ("linear", [("t0", {"weight": 1.0}), ("t1", {"weight": 2.0})], {"parameters": {"normalize": False}},
         "`parameters.normalize`: false with weights summing to 3"),
        ("linear", TWO, {"slices": [{"sources": []}]}, "`slices` is not supported"),
        ("linear", TWO, {"tokenizer_source": "union"}, "`tokenizer_source`"),
        ("linear", TWO, {"dtype": "int8"}, "`dtype`: expected one of"),
        ("tsv_m", TWO, {"base_model": BASE, "parameters": {"density": 0.5}}, "`parameters.density`: expected a"
         " parameter of tsv_m"),
    ],
)
def test_what_has_no_equivalent_is_a_one_line_error_naming_the_field(folder, capsys, method, models, top, field):
    path = config(folder, method, models, **top)
    assert main(["--config", path, "--output", str(folder / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-merge: error: cannot read --config: mergekit field ") and err.count("\n") == 1
    assert field in err, err
    assert not (folder / "out").exists()


def test_models_must_be_a_list_of_mappings(folder, capsys):
    (folder / "mk.yaml").write_text("merge_method: linear\nmodels: {model: t0.safetensors}\n")
    assert main(["--config", str(folder / "mk.yaml"), "--output", str(folder / "out")]) == 2
    assert "mergekit field `models`: expected a non-empty list" in capsys.readouterr().err
