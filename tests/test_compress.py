"""TSV-C (METHODS.md, "TSV-C"): the math against a naive float64 reference and its algebra, then compressed tasks on
disk as peft LoRA adapters and the compact form."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lightning_merge import functional as F
from lightning_merge.compress import TSVC, check_task_names, compress_checkpoints, default_task_names, load_compressed
from lightning_merge.compress.layout import module_kind
from lightning_merge.io.record import MergeRecord
from tests import reference as ref

f64 = torch.float64


def spectrum_matrix(m, n, s, seed=0, dtype=f64):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=f64)).Q
    V = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=f64)).Q
    return ((U * torch.tensor(s, dtype=f64)) @ V.T).to(dtype)


def low_rank_plus_noise(m, n, rank, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    signal = spectrum_matrix(m, n, list(np.logspace(0, -1.5, rank)), seed)
    return signal + noise * torch.randn(m, n, generator=g, dtype=f64) / (m * n) ** 0.5 * signal.norm()


# ------------------------------------------------------------------------------------------------------ the math
@pytest.mark.parametrize(("m", "n", "rank", "T"), [(30, 20, 5, 1), (20, 30, None, 3), (64, 48, 0.25, 1), (9, 9, 9, 1)])
def test_tsv_c_matches_the_naive_reference(m, n, rank, T):
    d = torch.randn(m, n, dtype=f64, generator=torch.Generator().manual_seed(1))
    t = F.tsv_c(d, rank=rank, num_tasks=T, solver="exact")
    expected_k = {5: 5, None: min(m, n) // T, 0.25: int(0.25 * min(m, n)), 9: 9}[rank]
    expected, _ = ref.tsv_c(d.numpy(), expected_k)
    assert t.rank == expected_k
    assert np.allclose(t.dense().numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("solver", ["exact", "auto"])
def test_tsv_c_tasks_is_each_task_truncated_like_the_reference(solver):
    # the T task matrices of one key as one batch: each is its own rank-k truncation (k = r / T by default)
    deltas = torch.stack([low_rank_plus_noise(96, 80, 6, 1e-3, seed=t) for t in range(3)]).float()
    for rank in (None, 5):
        got = F.tsv_c_tasks(deltas, rank=rank, solver=solver)
        k = 80 // 3 if rank is None else rank
        for d, t in zip(deltas, got, strict=True):
            want, _ = ref.tsv_c(d.double().numpy(), k)
            assert t.rank == k
            assert np.linalg.norm(t.dense().double().numpy() - want) <= 1e-4 * np.linalg.norm(want)
    energy = F.tsv_c_tasks(deltas.double(), energy=0.9, solver="exact")
    assert [t.rank for t in energy] == [ref.tsv_c(d.numpy(), energy=0.9)[1] for d in deltas.double()]


def test_tsv_c_tasks_auto_tries_one_sketch_where_the_first_task_does_not_converge(monkeypatch, tmp_path):
    # a flat spectrum (no gap at k) on every task: the first sketch fails, so the key takes the exact path and
    # the other tasks are not sketched (per-task calls sketched every one)
    from lightning_merge.functional import svd

    sketched = []
    real = svd._randomized_svd
    monkeypatch.setattr(svd, "_randomized_svd", lambda x, *a: sketched.append(x.shape[0]) or real(x, *a))
    flat = torch.stack([spectrum_matrix(256, 256, list(np.linspace(1, 0.5, 256)), seed=t) for t in range(4)])
    got = F.tsv_c_tasks(flat.float(), rank=16, solver="auto")
    assert sketched == [1]
    for d, t in zip(flat.float(), got, strict=True):  # the exact truncation (s_16 - s_17 is 0.2% of s_1)
        want, _ = ref.tsv_c(d.double().numpy(), 16)
        assert np.linalg.norm(t.dense().double().numpy() - want) <= 1e-3 * np.linalg.norm(want)
    sketched.clear()  # the command's path: one sketch per key, not one per task and key
    base = {"a.weight": torch.zeros(256, 256), "b.weight": torch.zeros(256, 256)}
    tuned = [{key: flat[t].float() for key in base} for t in range(4)]
    compress_checkpoints(base, tuned, tmp_path / "c", rank=16, format="safetensors", progress=False)
    assert sketched == [1, 1]
    with pytest.raises(ValueError, match="task_matrices"):
        F.tsv_c_tasks(flat[0], rank=4)
    with pytest.raises(ValueError, match="finite"):
        F.tsv_c_tasks(torch.stack([flat[0], flat[1] * float("nan")]), rank=4)


def test_randomized_path_matches_the_reference_on_low_rank_plus_noise():
    d = low_rank_plus_noise(256, 192, rank=16, noise=1e-3)
    t = F.tsv_c(d, rank=16, solver="auto")
    expected, _ = ref.tsv_c(d.numpy(), 16)
    assert np.linalg.norm(t.dense().numpy() - expected) / np.linalg.norm(expected) < 1e-5  # the sketch's error


@pytest.mark.parametrize("solver", ["exact", "randomized", "auto"])
def test_a_rank_k_matrix_is_kept_exactly(solver):
    d = spectrum_matrix(200, 160, [5.0, 3.0, 2.0, 1.0, 0.5])
    t = F.tsv_c(d, rank=8, solver=solver)
    assert t.rank == 5  # the round-off components beyond the rank are dropped
    assert torch.allclose(t.dense(), d, atol=1e-12)


def test_eckart_young_error_is_the_dropped_energy_and_optimal():
    d = torch.randn(24, 18, dtype=f64, generator=torch.Generator().manual_seed(2))
    s = torch.linalg.svdvals(d)
    for k in (1, 4, 10):
        t = F.tsv_c(d, rank=k, solver="exact")
        error = float(torch.linalg.matrix_norm(d - t.dense()) ** 2)
        assert error == pytest.approx(float((s[k:] ** 2).sum()), rel=1e-10)
        g = torch.Generator().manual_seed(k)
        for _ in range(20):  # no other rank-k matrix does better: random ones, and perturbations of the optimum
            other = torch.randn(24, k, generator=g, dtype=f64) @ torch.randn(k, 18, generator=g, dtype=f64)
            assert float(torch.linalg.matrix_norm(d - other) ** 2) > error
            near = (t.U + 1e-3 * torch.randn(t.U.shape, generator=g, dtype=f64)) * t.s @ t.V.T
            assert float(torch.linalg.matrix_norm(d - near) ** 2) > error


@pytest.mark.parametrize("dtype", [f64, torch.float32])
def test_full_rank_is_lossless(dtype):
    d = torch.randn(20, 12, generator=torch.Generator().manual_seed(3)).to(dtype)
    t = F.tsv_c(d, rank=1.0)
    assert t.rank == 12
    assert torch.allclose(t.dense(), d.to(t.U.dtype), atol=1e-12 if dtype == f64 else 1e-5)


@pytest.mark.parametrize("solver", ["exact", "auto", "randomized"])
@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 0.999, 1.0])
def test_energy_picks_the_smallest_k(solver, energy):
    s = [2.0**-i for i in range(40)]  # well separated: the exact and sketched smallest k agree
    d = spectrum_matrix(256, 200, s)
    t = F.tsv_c(d, energy=energy, solver=solver)
    expected, k = ref.tsv_c(d.numpy(), energy=energy)
    total = float((d**2).sum())
    assert float((t.s**2).sum()) >= energy * total * (1 - 1e-12)
    if energy < 1.0:
        assert t.rank == k and float((t.s[:-1] ** 2).sum()) < energy * total
    assert np.allclose(t.dense().numpy(), expected, atol=1e-9 if solver == "exact" else 1e-6)


def test_energy_on_low_rank_plus_noise_keeps_the_energy():
    d = low_rank_plus_noise(300, 200, rank=20, noise=0.05)
    for solver in ("auto", "exact"):
        t = F.tsv_c(d, energy=0.95, solver=solver)
        assert float((t.s.double() ** 2).sum()) >= 0.95 * float((d**2).sum()) * (1 - 1e-9)
    assert F.tsv_c(d, energy=0.95, solver="auto").rank >= F.tsv_c(d, energy=0.95, solver="exact").rank


def test_zero_matrix_keeps_nothing_and_lora_factors_multiply_back():
    assert F.tsv_c(torch.zeros(8, 6)).rank == 0 and F.tsv_c(torch.zeros(8, 6), energy=0.9).rank == 0
    d = torch.randn(8, 6, dtype=f64)
    lora = F.tsv_c(d, rank=6).lora()
    assert lora.scale == 1.0 and torch.allclose(lora.B @ lora.A, d)
    assert F.compressed_numel((8, 6), 2) == 30


def test_inputs_are_not_modified_and_half_precision_runs_in_float32():
    d = torch.randn(16, 12).to(torch.bfloat16)
    before = d.clone()
    t = F.tsv_c(d, rank=3)
    assert torch.equal(d, before) and t.U.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": 0}, ValueError, "`rank` to be None, a positive int"),
        ({"rank": 1.5}, ValueError, "`rank`"),
        ({"energy": 0.0}, ValueError, r"`energy` to be None or a float in \(0, 1\]"),
        ({"energy": 1.2}, ValueError, "`energy`"),
        ({"rank": 2, "energy": 0.9}, ValueError, "at most one of the arguments `rank` and `energy`"),
        ({"num_tasks": 0}, ValueError, "`num_tasks` to be a positive int"),
        ({"solver": "lanczos"}, ValueError, "`solver` to be one of"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        F.tsv_c(torch.randn(6, 5), **kwargs)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="non-empty 2-D matrix.*HINT"):
        F.tsv_c(torch.randn(6))
    with pytest.raises(TypeError, match="floating-point torch.Tensor"):
        F.tsv_c(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="NaN or Inf"):
        F.tsv_c(torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError, match="at most one"):
        TSVC(rank=2, energy=0.5)


# ------------------------------------------------------------------------------------------------ on disk
def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


@pytest.fixture(scope="module")
def bert_tasks():
    base = {k: v.clone() for k, v in tiny_bert().state_dict().items()}
    g = torch.Generator().manual_seed(1)
    tuned = {t: {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                 for k, v in base.items()} for t in ("sst2", "mnli")}
    return base, tuned


def test_lossless_task_loads_with_peft_and_merges_to_the_finetuned_weights(tmp_path, bert_tasks):
    peft = pytest.importorskip("peft")
    base, tuned = bert_tasks
    record = compress_checkpoints(base, tuned, tmp_path / "out", rank=1.0, progress=False)
    config = json.loads((tmp_path / "out" / "sst2" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 32
    assert config["rank_pattern"] == config["alpha_pattern"] == {"embeddings.token_type_embeddings": 2}
    assert "encoder.layer.0.attention.self.query" in config["target_modules"]
    model = tiny_bert()
    model.load_state_dict(base)
    merged = peft.PeftModel.from_pretrained(model, tmp_path / "out" / "sst2").merge_and_unload().state_dict()
    lora_keys = [k for k in base if base[k].ndim == 2]
    for key in lora_keys:
        assert torch.allclose(merged[key], tuned["sst2"][key], atol=1e-6), key
    # the rest (biases, LayerNorm) is beside the adapter; load_compressed gives the whole task
    full = load_compressed(tmp_path / "out" / "sst2", base)
    assert set(full) == set(record.merged_keys)
    for key, value in full.items():
        assert torch.allclose(value, tuned["sst2"][key], atol=1e-6), key


def test_compact_form_round_trips_and_record_holds_the_ratio(tmp_path, bert_tasks):
    base, tuned = bert_tasks
    record = compress_checkpoints(base, tuned, tmp_path / "out", rank=4, format="safetensors", progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["merge_record.json", "mnli", "sst2"]
    assert [p.name for p in (tmp_path / "out" / "mnli").iterdir()] == ["tsv_c.safetensors"]
    deltas = load_compressed(tmp_path / "out" / "mnli")
    for key in record.merged_keys:
        d = tuned["mnli"][key] - base[key]
        expected = F.tsv_c(d, rank=4).dense() if d.ndim == 2 else d
        assert torch.allclose(deltas[key], expected, atol=1e-6), key
    saved = json.loads((tmp_path / "out" / "merge_record.json").read_text())
    assert saved["method"] == "tsv_c" and saved["options"] == {"rank": 4, "energy": None, "solver": "auto"}
    assert saved["tasks"] == ["sst2", "mnli"] and MergeRecord.load(tmp_path / "out").method == "tsv_c"
    c = saved["compression"]
    assert 0 < c["ratio"] < 1 and c["tasks"]["sst2"]["ranks"]["encoder.layer.0.output.dense.weight"] == 4
    shapes = {k: base[k].shape for k in record.merged_keys}
    small = sum(min(4, *s) * (s[0] + s[1] + 1) if len(s) == 2 else s.numel() for s in shapes.values()) * 4
    assert c["tasks"]["mnli"]["bytes"] == small and c["bytes"] == 2 * small
    assert c["full_bytes"] == 2 * sum(base[k].numel() * 4 for k in record.merged_keys)


def test_both_formats_from_checkpoint_files_with_energy(tmp_path, bert_tasks):
    base, tuned = bert_tasks
    save_file(base, str(tmp_path / "base.safetensors"))
    paths = []
    for name, state in tuned.items():
        torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, tmp_path / f"{name}.ckpt")
        paths.append(tmp_path / f"{name}.ckpt")
    record = compress_checkpoints(tmp_path / "base.safetensors", paths, tmp_path / "out", energy=0.5, format="both",
                                  prefix="model.", base_prefix="", exclude=["pooler.*"], progress=False)
    assert record.tasks == ["sst2", "mnli"] and record.excluded_keys == ["pooler.dense.bias", "pooler.dense.weight"]
    folder = tmp_path / "out" / "sst2"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                        "tsv_c.safetensors"]
    assert all(f["hash"].startswith("xxh3_128:") for i in record.inputs for f in i["files"])
    ranks = record.compression["tasks"]["sst2"]["ranks"]
    assert len(set(ranks.values())) > 1  # energy picks a k per matrix: the adapter lists them in rank_pattern
    config = json.loads((folder / "adapter_config.json").read_text())
    assert all(config["rank_pattern"].get(k.removesuffix(".weight"), config["r"]) == r for k, r in ranks.items())
    weights = load_compressed(folder, tmp_path / "base.safetensors")
    key = "encoder.layer.1.intermediate.dense.weight"
    d = tuned["sst2"][key] - base[key]
    kept = torch.linalg.matrix_norm(weights[key] - base[key]) ** 2
    assert kept >= 0.5 * torch.linalg.matrix_norm(d) ** 2 * (1 - 1e-5)


def test_module_kinds_from_names_or_the_model():
    model = tiny_bert()
    assert module_kind("embeddings.word_embeddings.weight", model) == "embedding"
    assert module_kind("encoder.layer.0.output.dense.weight", model) == "linear"
    assert module_kind("embeddings.LayerNorm.weight", model) is None and module_kind("x.lora_A", None) is None
    assert module_kind("transformer.wte.weight") == "embedding"


def test_bad_task_names_fail_before_any_work(tmp_path, bert_tasks):
    base, tuned = bert_tasks
    for names, match in [(["../x", "b"], "path separators"), (["a", "A"], "distinct task names"),
                         (["", "b"], "non-empty"), ([".hidden", "b"], "does not start with '.'"),
                         (["a\0", "b"], "NUL")]:
        with pytest.raises(ValueError, match=match):
            compress_checkpoints(base, dict(zip(names, tuned.values(), strict=True)), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert default_task_names(["a/model.ckpt", "b/model.ckpt"]) == ["task0", "task1"]
    assert check_task_names(["a-1", "b.2"]) == ["a-1", "b.2"]


def test_bad_options_and_outputs_are_clear_errors(tmp_path, bert_tasks):
    base, tuned = bert_tasks
    with pytest.raises(ValueError, match="`format` to be one of"):
        compress_checkpoints(base, tuned, tmp_path / "out", format="lora", progress=False)
    with pytest.raises(ValueError, match="at most one of the arguments `rank` and `energy`"):
        compress_checkpoints(base, tuned, tmp_path / "out", rank=2, energy=0.9, progress=False)
    with pytest.raises(TypeError, match="wrap a single checkpoint in a list"):
        compress_checkpoints(base, "a.ckpt", tmp_path / "out", progress=False)
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        compress_checkpoints(base, tuned, tmp_path / "out", progress=False)


@pytest.mark.parametrize(("meta", "tensors", "match"), [
    ("{not json", {"w": torch.zeros(2)}, "written by TSV-C"),
    (json.dumps({"factored": "w"}), {"w": torch.zeros(2)}, "written by TSV-C"),
    (json.dumps({"factored": ["w"], "modules": []}), {"w": torch.zeros(2)}, "written by TSV-C"),
    (json.dumps({"factored": ["w"]}), {"w.U": torch.zeros(3, 2), "w.s": torch.zeros(2)}, r"\['w.V'\] are missing"),
    (json.dumps({"factored": ["w"]}), {"w.U": torch.zeros(3, 2), "w.s": torch.zeros(2), "w.V": torch.zeros(4, 5)},
     r"U \(m, k\), s \(k,\) and V \(n, k\), but got \(3, 2\), \(2,\) and \(4, 5\)"),
])
def test_a_hostile_compact_file_is_a_clear_error_naming_it(tmp_path, meta, tensors, match):
    save_file(tensors, str(tmp_path / "tsv_c.safetensors"), metadata={"format": "pt", "tsv_c": meta})
    with pytest.raises(ValueError, match=match) as error:
        load_compressed(tmp_path)
    assert "tsv_c.safetensors" in str(error.value)
