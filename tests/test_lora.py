"""LoRA adapters: the factored path against the dense path, peft round trips on tiny models, and every refusal."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from lightning_merge import functional as F
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
from lightning_merge.lora import (
    LoraAdapter,
    check_compatible,
    load_adapter,
    merge_adapters,
    merge_into_base,
    merged_config,
)
from lightning_merge.methods import SFTM, TSVM, get_method

f64 = torch.float64


def rel(a, b):
    return float((a.to(f64) - b.to(f64)).norm() / b.to(f64).norm())


def random_updates(m, n, ranks, dtype=f64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        LowRankUpdate(torch.randn(m, r, generator=g, dtype=dtype), torch.randn(r, n, generator=g, dtype=dtype), 2.0 / r)
        for r in ranks
    ]


DENSE = {
    "tsv_m": lambda d, **kw: F.tsv_m(d, solver="exact", **kw),
    "sftm": lambda d, **kw: F.sftm(d, solver="exact", **kw),
    "sftm_orthogonal": lambda d, **kw: F.sftm(d, solver="exact", basis="orthogonal", **kw),
    "sftm_mapping": lambda d, **kw: F.sftm(d, solver="exact", fit="mapping", **kw),
    "sftm_orthogonal_mapping": lambda d, **kw: F.sftm(d, solver="exact", basis="orthogonal", fit="mapping", **kw),
}
FACTORS = {
    "tsv_m": TSVM().factors,
    "sftm": SFTM().factors,
    "sftm_orthogonal": SFTM(basis="orthogonal").factors,
    "sftm_mapping": SFTM(fit="mapping").factors,
    "sftm_orthogonal_mapping": SFTM(basis="orthogonal", fit="mapping").factors,
}


# ---------------------------------------------------------------------------------------- functional core
@pytest.mark.parametrize(("m", "n", "r"), [(30, 20, 4), (12, 40, 7), (6, 5, 8)])
def test_lora_svd_is_the_svd_of_the_dense_update(m, n, r):
    (update,) = random_updates(m, n, [r])
    U, s, V = lora_svd(update._replace(scale=-1.5))
    dense = lora_dense(update._replace(scale=-1.5))
    expected = torch.linalg.svdvals(dense)[: min(m, n, r)]
    assert torch.allclose(s, expected, rtol=1e-12, atol=0)
    assert rel((U * s) @ V.T, dense) < 1e-13
    eye = torch.eye(len(s), dtype=f64)
    assert torch.allclose(U.T @ U, eye) and torch.allclose(V.T @ V, eye)


def test_lora_svd_drops_numerically_zero_components():
    B = torch.randn(10, 2, dtype=f64) @ torch.randn(2, 5, dtype=f64)  # rank 2 although r = 5
    U, s, V = lora_svd(LowRankUpdate(B, torch.randn(5, 8, dtype=f64)))
    assert s.shape == (2,) and U.shape == (10, 2) and V.shape == (8, 2)
    assert lora_svd(LowRankUpdate(torch.zeros(10, 5, dtype=f64), torch.randn(5, 8, dtype=f64)))[1].numel() == 0


@pytest.mark.parametrize(("m", "n", "dtype", "second"), [(96, 64, f64, 40), (768, 768, torch.float32, 100)])
def test_dense_and_factored_paths_keep_the_same_components(m, n, dtype, second):
    # s_2 = `second` eps s_1 lies between sqrt(max(m, n)) eps (the one numerical-rank tolerance) and max(m, n) eps:
    # one rule for both paths keeps it on both, two rules would keep it on one only
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(m, 2, generator=g, dtype=f64)).Q
    V = torch.linalg.qr(torch.randn(n, 2, generator=g, dtype=f64)).Q
    s = torch.tensor([1.0, second * torch.finfo(dtype).eps], dtype=f64)
    update = LowRankUpdate((U * s).to(dtype), V.T.to(dtype).contiguous())
    dense = F.task_features(lora_dense(update)[None], 2, solver="exact")[1]
    factored = lora_svd(update)[1]
    assert dense.numel() == factored.numel() == 2
    assert lora_task_features([update], 2)[1].numel() == 2


@pytest.mark.parametrize("method", sorted(DENSE))
@pytest.mark.parametrize("rank", [None, 3, 0.5])
@pytest.mark.parametrize(("m", "n", "ranks"), [(48, 40, [4, 8, 2]), (40, 48, [8, 8, 8]), (30, 20, [16, 3])])
def test_factored_path_equals_dense_path(method, rank, m, n, ranks):
    updates = random_updates(m, n, ranks)
    merged = lora_merge(updates, FACTORS[method], rank=rank, scaling=0.7)
    expected = DENSE[method]([lora_dense(u) for u in updates], rank=rank, scaling=0.7)
    assert rel(merged.B @ merged.A, expected) < 1e-6
    assert merged.scale == 1.0 and merged.B.shape[1] <= sum(min(r, 20) for r in ranks)


def test_rank_budget_is_clamped_to_each_adapters_rank():
    updates = random_updates(64, 48, [4, 16, 2])  # k = 48 // 3 = 16: all kept
    U, s, V = lora_task_features(updates, 16)
    assert U.shape == (64, 22) and s.shape == (22,) and V.shape == (48, 22)
    assert lora_task_features(updates, 3)[1].shape == (8,)  # 3 + 3 + 2


def test_one_lora_task_gives_its_truncation_and_identical_tasks_one_copy():
    (update,) = random_updates(20, 16, [6])
    U, s, V = lora_svd(update)
    for T in (1, 3):
        for compact in (False, True):
            merged = lora_merge([update] * T, TSVM().factors, rank=4, compact=compact)
            assert rel(merged.B @ merged.A, (U[:, :4] * s[:4]) @ V[:, :4].T) < 1e-10
            assert merged.B.shape[1] == (4 if compact else 4 * T)


def test_zero_adapter_contributes_nothing_and_all_zero_gives_rank_one_zero():
    updates = random_updates(20, 16, [4, 4])
    zero = LowRankUpdate(torch.zeros(20, 4, dtype=f64), torch.randn(4, 16, dtype=f64))
    with_zero = lora_merge([*updates, zero], TSVM().factors, rank=4)
    assert rel(with_zero.B @ with_zero.A, lora_merge(updates, TSVM().factors, rank=4).B @ lora_merge(
        updates, TSVM().factors, rank=4).A) < 1e-10
    nothing = lora_merge([zero, zero], SFTM().factors, compact=True)
    assert nothing.B.shape == (20, 1) and nothing.A.shape == (1, 16) and not nothing.B.any()


@pytest.mark.parametrize("compact", [False, True])
def test_lora_sum_is_exact_and_balanced(compact):
    updates = random_updates(30, 25, [3, 5, 2])
    total = sum(lora_dense(u) for u in updates)
    summed = lora_sum(updates, scaling=0.5, compact=compact)
    assert rel(summed.B @ summed.A, 0.5 * total) < 1e-12 and summed.B.shape[1] == 10 and summed.scale == 1.0
    assert torch.allclose(summed.B.norm(dim=0), summed.A.norm(dim=1))


def test_balance_drops_round_off_terms_and_compact_finds_the_rank():
    B, A = torch.randn(30, 3, dtype=f64), torch.randn(3, 25, dtype=f64)
    B[:, 1] = 1e-20
    balanced = lora_balance(LowRankUpdate(B, A, -2.0))
    assert balanced.B.shape[1] == 2 and rel(balanced.B @ balanced.A, -2.0 * B @ A) < 1e-15
    (update,) = random_updates(30, 25, [3])
    duplicated = lora_compact(LowRankUpdate(torch.cat([update.B] * 2, 1), torch.cat([update.A] * 2, 0)))
    assert duplicated.B.shape[1] == 3 and rel(duplicated.B @ duplicated.A, 2 * update.B @ update.A) < 1e-13


def test_float32_and_bfloat16_factors_are_computed_in_float32():
    updates = random_updates(40, 32, [4, 4], dtype=torch.bfloat16)
    merged = lora_merge(updates, TSVM().factors)
    assert merged.B.dtype == torch.float32
    # the dense reference in float32 too: in float64 the float32 round-off of B @ A would count as features
    expected = F.tsv_m([lora_dense(u) for u in updates], solver="exact")
    assert rel(merged.B @ merged.A, expected) < 1e-5


def test_lora_scale_and_bad_arguments():
    assert lora_scale(16, 8) == 2.0 and lora_scale(16, 4, use_rslora=True) == 8.0
    with pytest.raises(ValueError, match="`r`"):
        lora_scale(16, 0)
    with pytest.raises(ValueError, match="at least one"):
        lora_merge([], TSVM().factors)
    with pytest.raises(ValueError, match=r"shape \(20, 16\)"):
        lora_merge([*random_updates(20, 16, [2]), *random_updates(20, 15, [2])], TSVM().factors)
    with pytest.raises(ValueError, match="B \\(m, r\\) and A \\(r, n\\)"):
        lora_svd(LowRankUpdate(torch.randn(5, 2), torch.randn(3, 4)))
    with pytest.raises(TypeError, match="floating-point"):
        lora_svd(LowRankUpdate(torch.ones(5, 2, dtype=torch.long), torch.ones(2, 4, dtype=torch.long)))
    with pytest.raises(ValueError, match="`rank`"):
        lora_merge(random_updates(5, 4, [2]), TSVM().factors, rank=0)


def test_core_imports_neither_lightning_nor_peft():
    code = (
        "import sys, lightning_merge.functional.lora, lightning_merge.lora;"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'peft', 'transformers') if m in sys.modules];"
        "sys.exit(bool(bad))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ------------------------------------------------------------------------------------ hand-written folders
def write_adapter(folder, modules, fmt="safetensors", extra=None, **config):
    """A peft-style adapter folder: ``modules`` maps module names to ``(B, A)``."""
    folder.mkdir(parents=True)
    tensors = dict(extra or {})
    for name, (B, A) in modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A
        tensors[f"base_model.model.{name}.lora_B.weight"] = B
    if fmt == "safetensors":
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    else:
        torch.save(tensors, folder / "adapter_model.bin")
    ranks = {A.shape[0] for B, A in modules.values()} or {2}
    full = {"peft_type": "LORA", "r": max(ranks), "lora_alpha": 8, "base_model_name_or_path": "tiny",
            "target_modules": sorted({name.split(".")[-1] for name in modules}), "bias": "none"}
    full["rank_pattern"] = {name: A.shape[0] for name, (B, A) in modules.items() if A.shape[0] != full["r"]}
    full.update(config)
    (folder / "adapter_config.json").write_text(json.dumps(full))
    return folder


def small_modules(r=2, seed=0, names=("layers.0.q", "layers.0.v"), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(12, r, generator=g, dtype=dtype), torch.randn(r, 10, generator=g, dtype=dtype))
            for name in names}


def test_load_adapter_reads_scales_patterns_and_bin(tmp_path):
    modules = small_modules(r=4)
    modules["layers.0.v"] = small_modules(r=2)["layers.0.v"]
    folder = write_adapter(tmp_path / "a", modules, fmt="bin", use_rslora=True, alpha_pattern={"v": 2})
    adapter = load_adapter(folder)
    assert sorted(adapter.modules) == ["layers.0.q", "layers.0.v"]
    assert adapter.modules["layers.0.q"].scale == 8 / 2  # alpha / sqrt(4)
    assert adapter.modules["layers.0.v"].scale == pytest.approx(2 / 2**0.5)  # alpha_pattern, rank_pattern
    assert torch.equal(adapter.modules["layers.0.q"].lora_B, modules["layers.0.q"][0])


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("name", ["tsv_m", "sftm", "average", "task_arithmetic"])
def test_merge_adapters_of_different_ranks_writes_the_merged_update(tmp_path, name, compact):
    folders = [write_adapter(tmp_path / f"a{r}", small_modules(r=r, seed=r, dtype=f64)) for r in (1, 2, 4)]
    method = get_method(name, weights=(1.0, -0.5, 2.0))
    merged = merge_adapters(method, folders, tmp_path / "merged", compact=compact)
    reread = load_adapter(tmp_path / "merged")
    for module in ("layers.0.q", "layers.0.v"):
        deltas = [load_adapter(f).modules[module].delta() for f in folders]
        expected = method.merge(deltas) if name in ("average", "task_arithmetic") else DENSE[name](
            deltas, weights=method.weights)
        assert rel(reread.modules[module].delta(), expected) < 1e-10
        assert merged.modules[module].rank <= 7
    assert reread.config["lora_alpha"] == reread.config["r"] and reread.config["use_rslora"] is False


def test_merged_config_lists_the_odd_ranks():
    config = merged_config({"r": 8, "lora_alpha": 16, "use_rslora": True, "init_lora_weights": "eva"},
                           {"a.q": 4, "a.v": 4, "b.q": 2})
    assert config["r"] == config["lora_alpha"] == 4 and config["use_rslora"] is False
    assert config["init_lora_weights"] is True
    assert config["rank_pattern"] == config["alpha_pattern"] == {"b.q": 2}


def test_merge_into_base_with_a_state_dict(tmp_path):
    modules = small_modules(r=2)
    adapter = load_adapter(write_adapter(tmp_path / "a", modules, fan_in_fan_out=True))
    base = {"layers.0.q.weight": torch.randn(10, 12), "layers.0.v.weight": torch.randn(10, 12), "other": torch.ones(1)}
    merged = merge_into_base(adapter, base)
    assert sorted(merged) == ["layers.0.q.weight", "layers.0.v.weight"]
    B, A = modules["layers.0.q"]
    assert torch.allclose(merged["layers.0.q.weight"], base["layers.0.q.weight"] + 4.0 * (B @ A).T, atol=1e-5)
    with pytest.raises(ValueError, match=r"'layers.0.q.weight' to have shape \(10, 12\).*fan_in_fan_out"):
        merge_into_base(adapter, {k: v.mT for k, v in base.items() if v.ndim == 2})
    with pytest.raises(ValueError, match="'layers.0.v.weight'"):
        merge_into_base(adapter, {"layers.0.q.weight": base["layers.0.q.weight"]})


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("peft_type", "IA3"),
        ("use_dora", True),
        ("use_qalora", True),
        ("lora_bias", True),
        ("bias", "lora_only"),
        ("modules_to_save", ["classifier"]),
        ("trainable_token_indices", [1, 2]),
        ("init_lora_weights", "pissa_niter_4"),
        ("init_lora_weights", "olora"),
        ("alora_invocation_tokens", [5]),
        ("target_parameters", ["experts.down_proj"]),
        ("layer_replication", [[0, 1]]),
        ("kasa_config", {"r": 2}),
        ("arrow_config", {"top_k": 2}),
    ],
)
def test_refuses_variants_that_are_not_scale_b_a(tmp_path, option, value):
    folder = write_adapter(tmp_path / "a", small_modules(), **{option: value})
    with pytest.raises(ValueError, match=f"`{option}`.*adapter_config.json"):
        load_adapter(folder)


@pytest.mark.parametrize(
    ("key", "tensor", "match"),
    [
        ("base_model.model.layers.0.q.lora_magnitude_vector", torch.ones(12), "lora_magnitude_vector.*HINT: DoRA"),
        ("base_model.model.layers.0.q.bias", torch.ones(12), "'base_model.model.layers.0.q.bias'"),
        ("base_model.model.classifier.modules_to_save.default.weight", torch.ones(2, 2), "modules_to_save"),
    ],
)
def test_refuses_tensors_that_are_not_lora_factors(tmp_path, key, tensor, match):
    folder = write_adapter(tmp_path / "a", small_modules(), extra={key: tensor})
    with pytest.raises(ValueError, match=match):
        load_adapter(folder)


def test_refuses_broken_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_adapter(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tmp_path / "empty")
    folder = write_adapter(tmp_path / "a", small_modules())
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors or adapter_model.bin"):
        load_adapter(folder)


def test_refuses_bad_factors(tmp_path):
    bad = small_modules()
    bad["layers.0.q"][0][0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite.*'layers.0.q'"):
        load_adapter(write_adapter(tmp_path / "nan", bad))
    with pytest.raises(ValueError, match=r"lora_A \(2, 10\) and lora_B \(12, 3\)"):
        load_adapter(write_adapter(tmp_path / "shape", {"q": (torch.randn(12, 3), torch.randn(2, 10))}, r=2))
    with pytest.raises(ValueError, match="rank 4 for module 'q'"):
        load_adapter(write_adapter(tmp_path / "rank", {"q": (torch.randn(12, 2), torch.randn(2, 10))}, r=4))
    conv = write_adapter(tmp_path / "conv", {"q": (torch.randn(12, 2, 1, 1), torch.randn(2, 10, 3, 3))}, r=2)
    with pytest.raises(ValueError, match="convolutions"):
        load_adapter(conv)
    half = tmp_path / "half"
    write_adapter(half, {}, extra={"base_model.model.q.lora_A.weight": torch.randn(2, 10)}, r=2)
    with pytest.raises(ValueError, match="lora_B is missing"):
        load_adapter(half)


def test_refuses_incompatible_adapters(tmp_path):
    first = write_adapter(tmp_path / "a", small_modules())
    other_base = write_adapter(tmp_path / "b", small_modules(), base_model_name_or_path="other")
    with pytest.raises(ValueError, match="`base_model_name_or_path`.*'tiny'.*'other'"):
        merge_adapters("tsv_m", [first, other_base])
    other_modules = write_adapter(tmp_path / "c", small_modules(names=("layers.0.q", "layers.0.k")))
    with pytest.raises(ValueError, match="c lacks layers.0.v; .*c also adapts layers.0.k"):
        merge_adapters("tsv_m", [first, other_modules])
    g = torch.Generator().manual_seed(0)
    wide = {name: (torch.randn(12, 2, generator=g), torch.randn(2, 11, generator=g)) for name in small_modules()}
    with pytest.raises(ValueError, match=r"'layers.0.q' to have B @ A of shape \(12, 10\).*\(12, 11\)"):
        merge_adapters("tsv_m", [first, write_adapter(tmp_path / "d", wide)])
    embed = "base_model.model.embed.base_layer.weight"
    e1 = write_adapter(tmp_path / "e1", small_modules(), extra={embed: torch.zeros(3, 2)})
    e2 = write_adapter(tmp_path / "e2", small_modules(), extra={embed: torch.ones(3, 2)})
    with pytest.raises(ValueError, match="non-LoRA tensor .*embed.base_layer.weight"):
        merge_adapters("tsv_m", [e1, e2])
    with pytest.raises(ValueError, match="at least one adapter"):
        check_compatible([])


def test_refuses_methods_without_a_low_rank_form_and_bad_arguments(tmp_path):
    folder = write_adapter(tmp_path / "a", small_modules())
    with pytest.raises(ValueError, match="`method`.*'ties'"):
        merge_adapters("ties", [folder, folder])
    with pytest.raises(ValueError, match="`weights`.*one entry per task"):
        merge_adapters(TSVM(weights=(1.0,)), [folder, folder])
    with pytest.raises(ValueError, match="`adapters`"):
        merge_adapters("tsv_m", str(folder))
    with pytest.raises(TypeError, match=r"`adapters\[1\]`"):
        merge_adapters("tsv_m", [folder, 3])


# ---------------------------------------------------------------------------------------------- peft models
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def tiny_llama():
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=100)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2():
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=16)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def save_random_adapter(make_model, folder, seed, **lora_options):
    model = peft.get_peft_model(make_model(), peft.LoraConfig(**lora_options))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:  # lora_B starts at zero: make every factor random
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    model.save_pretrained(folder)
    return folder


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]


@pytest.fixture(scope="module")
def llama_adapters(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama")
    options = [
        {"r": 4, "lora_alpha": 8},
        {"r": 8, "lora_alpha": 4, "use_rslora": True, "rank_pattern": {"model.layers.1.self_attn.q_proj": 2}},
        {"r": 2, "lora_alpha": 16, "alpha_pattern": {"down_proj": 2}},
    ]
    return [save_random_adapter(tiny_llama, tmp / f"a{t}", t, target_modules=LLAMA_TARGETS, **o)
            for t, o in enumerate(options)]


def test_load_adapter_and_merge_into_base_agree_with_peft(llama_adapters):
    ids = torch.randint(0, 100, (2, 7))
    for folder in llama_adapters:
        expected = logits(peft.PeftModel.from_pretrained(tiny_llama(), folder).eval(), ids)
        model = tiny_llama()
        model.load_state_dict(merge_into_base(load_adapter(folder), model), strict=False)
        assert torch.allclose(logits(model, ids), expected, atol=1e-4)


@pytest.mark.parametrize("method", [TSVM(scaling=0.8), SFTM(basis="orthogonal")])
def test_merged_adapter_loads_in_peft_and_equals_the_dense_merge(llama_adapters, tmp_path, method):
    merge_adapters(method, llama_adapters, tmp_path / "merged")
    ids = torch.randint(0, 100, (2, 7))
    merged = logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "merged").eval(), ids)
    reference = tiny_llama()
    adapters = [load_adapter(folder) for folder in llama_adapters]
    state = reference.state_dict()
    for name in adapters[0].modules:
        deltas = [a.modules[name].delta() for a in adapters]  # float32 (see the bfloat16 test)
        state[f"{name}.weight"] = state[f"{name}.weight"] + method.merge(deltas)
    reference.load_state_dict(state)
    assert torch.allclose(merged, logits(reference, ids), atol=1e-4)
    assert not torch.allclose(merged, logits(tiny_llama(), ids), atol=1e-2)


def test_fan_in_fan_out_conv1d_adapters(tmp_path):
    folders = [save_random_adapter(tiny_gpt2, tmp_path / f"g{t}", t, r=2 + 2 * t, lora_alpha=4,
                                   target_modules=["c_attn", "c_proj"], fan_in_fan_out=True) for t in range(2)]
    merged = merge_adapters("sftm", folders, tmp_path / "merged")
    ids = torch.randint(0, 100, (2, 7))
    via_peft = logits(peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "merged").eval(), ids)
    base = tiny_gpt2()
    base.load_state_dict(merge_into_base(merged, base), strict=False)
    assert torch.allclose(via_peft, logits(base, ids), atol=1e-4)
    adapters = [load_adapter(f) for f in folders]
    name = "transformer.h.0.attn.c_attn"
    assert adapters[0].modules[name].delta().shape == (32, 96)  # Conv1D holds (in, out)
    expected = F.sftm([a.modules[name].delta().T for a in adapters], solver="exact").T
    assert rel(merged.modules[name].delta(), expected) < 1e-5


def test_merged_adapter_object_round_trips(llama_adapters, tmp_path):
    merged = merge_adapters("tsv_m", llama_adapters, dtype=torch.float64)
    assert isinstance(merged, LoraAdapter) and merged.path is None
    assert next(iter(merged.modules.values())).lora_A.dtype == torch.float64
    assert any(key.endswith("base_layer.weight") for key in merged.extra)  # peft's embedding copy, passed through
    # r = 4 + 8 + 2 = 14 but 4 + 2 + 2 where the second adapter has rank 2, and 4 + 5 + 2 on the (16, 32) k and v
    # projections, where the budget is k = 16 // 3 = 5
    kv = {f"model.layers.{i}.self_attn.{p}_proj": 11 for i in range(2) for p in "kv"}
    assert merged.config["r"] == 14 and merged.config["rank_pattern"] == {"model.layers.1.self_attn.q_proj": 8, **kv}
    merged.save(tmp_path / "out")
    reread = load_adapter(tmp_path / "out")
    assert set(reread.modules) == set(merged.modules)
    for name, module in merged.modules.items():
        assert torch.equal(reread.modules[name].lora_A, module.lora_A) and reread.modules[name].scale == 1.0


def test_saving_an_adapter_never_replaces_a_folder_of_the_users(llama_adapters, tmp_path):
    merged = merge_adapters("average", llama_adapters)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="`output_dir`"):
        merged.save(mine)
    with pytest.raises(ValueError, match="holds no merge_record.json"):
        merged.save(mine, overwrite=True)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep"
    merged.save(tmp_path / "new")
    assert load_adapter(tmp_path / "new").modules.keys() == merged.modules.keys()
