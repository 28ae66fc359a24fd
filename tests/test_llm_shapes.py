"""The engine on decoder-shaped Hugging Face folders (issue 19): Llama and Mistral configs with grouped-query
attention, tied and untied embeddings of a vocabulary-sized matrix, bf16 weights, sharded safetensors with an index;
the merged folder loads with ``from_pretrained`` and holds the float64 references' weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_merge.engine import merge_checkpoints
from lightning_merge.io import open_source
from tests import reference

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, MLP, HEADS, KV_HEADS = 16384, 32, 48, 4, 2  # 16384 x 32: vocabulary-sized (merged as an average)
SHARD = 600_000  # bytes: each folder is saved in several shards


def decoder(kind: str, tied: bool):
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=2,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=32,
                  tie_word_embeddings=tied, torch_dtype="bfloat16")
    config = (transformers.MistralConfig(sliding_window=16, **common) if kind == "mistral"
              else transformers.LlamaConfig(**common))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    return model


def finetune(model, seed: int) -> None:
    """A synthetic fine-tune: a rank-2 update plus small noise on every matrix, noise on the rest."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            delta = (1e-3 if param.ndim == 2 else 0.05) * torch.randn(param.shape, generator=g)
            if param.ndim == 2:
                delta += 0.02 * torch.randn(param.shape[0], 2, generator=g) @ torch.randn(2, param.shape[1],
                                                                                        generator=g)
            param.add_(delta.to(param.dtype))


@pytest.fixture(params=[("llama", True), ("llama", False), ("mistral", False)], ids=["llama-tied", "llama-untied",
                                                                                    "mistral-untied"])
def folders(request, tmp_path) -> tuple[Path, list[Path], bool]:
    kind, tied = request.param
    paths = []
    for seed in range(3):  # the base, then two fine-tunes
        model = decoder(kind, tied)
        if seed:
            finetune(model, seed)
        model.save_pretrained(tmp_path / f"m{seed}", max_shard_size=SHARD)
        paths.append(tmp_path / f"m{seed}")
    assert (paths[0] / "model.safetensors.index.json").is_file()
    return paths[0], paths[1:], tied


def float64_reference(method: str, base: Path, tuned: list[Path]) -> dict[str, np.ndarray]:
    """Each key's merge in float64 from the stored bf16 values (tests/reference.py), as the engine should give."""
    src, fts = open_source(base), [open_source(t) for t in tuned]
    out = {}
    for key in src.keys():
        w0 = src.get_tensor(key).double().numpy()
        deltas = [f.get_tensor(key).double().numpy() - w0 for f in fts]
        vocabulary = w0.ndim == 2 and max(w0.shape) >= 16384 and max(w0.shape) >= 8 * min(w0.shape)
        if method == "task_arithmetic":
            merged = 0.5 * sum(deltas)
        elif method == "ties":
            merged = reference.ties(deltas, 0.5).reshape(w0.shape)
        elif w0.ndim == 2 and not vocabulary:  # tsv_m: matrices by their singular features, k = min(m, n) // 2
            merged = reference.tsv_m(deltas, min(w0.shape) // 2)
        else:
            merged = np.mean(deltas, 0)
        out[key] = w0 + merged
    return out


def cut_off_ties(base: Path, tuned: list[Path], key: str, density: float = 0.5) -> np.ndarray:
    """Where TIES' trim is ambiguous: entries whose magnitude equals a task's cut-off (bf16 values tie often), which
    either implementation may keep."""
    w0 = open_source(base).get_tensor(key).double().numpy()
    ambiguous = np.zeros(w0.shape, bool)
    for t in tuned:
        size = np.abs(open_source(t).get_tensor(key).double().numpy() - w0)
        cut = np.sort(size.ravel())[::-1][int(np.ceil(density * size.size)) - 1]
        ambiguous |= size == cut
    return ambiguous


@pytest.mark.parametrize(("method", "options"), [("task_arithmetic", {"scaling": 0.5}), ("ties", {"density": 0.5}),
                                                 ("tsv_m", {})])
def test_decoder_folder_merges_and_loads_with_from_pretrained(folders, tmp_path, method, options):
    base, tuned, tied = folders
    out = tmp_path / "merged"
    from lightning_merge.methods import get_method

    merge_checkpoints(get_method(method, **options), base, tuned, out, progress=False, max_shard_size=SHARD)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded like the inputs
    assert ("lm_head.weight" in index["weight_map"]) != tied  # a tied head is stored once, as in the base
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and model.config.num_key_value_heads == KV_HEADS
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (KV_HEADS * HIDDEN // HEADS, HIDDEN)
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    want = float64_reference(method, base, tuned)
    state = model.state_dict()
    for key, value in want.items():
        got, value = state[key].double().numpy(), value
        sure = ~cut_off_ties(base, tuned, key) if method == "ties" else np.ones(value.shape, bool)
        assert value.size < 4096 or sure.mean() > 0.9, key  # the matrices are compared almost everywhere
        # the engine computes in float32 and rounds once to bf16: within one bf16 step of the float64 value
        np.testing.assert_allclose(got[sure], value[sure], rtol=2**-7, atol=1e-6, err_msg=key)
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, VOCAB) and torch.isfinite(logits).all()
