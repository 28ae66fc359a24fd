"""Merges of Hugging Face model folders load with ``from_pretrained``: outputs get the base's config and tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_merge import merge_adapters_into_base
from lightning_merge.engine import merge_checkpoints, merge_keys
from lightning_merge.io import open_source
from lightning_merge.methods import get_method

transformers = pytest.importorskip("transformers")

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "merge"]


def tokenizer_into(folder: Path) -> None:
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer_class = getattr(transformers, "BertTokenizerFast", transformers.BertTokenizer)
    tokenizer_class(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)


def save_model(model, folder: Path, seed: int, sharded: bool) -> Path:
    """``model`` with its weights moved by ``seed`` (0: unchanged), saved with ``save_pretrained``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters() if seed else []:
            param.add_(0.05 * torch.randn(param.shape, generator=g))
    model.save_pretrained(folder, max_shard_size="8KB" if sharded else "5GB")
    return folder


def tiny_bert():
    config = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    return transformers.BertModel(config)


def tiny_llama():
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def folders(tmp_path: Path, build, sharded: bool, tokenizer: bool = True) -> tuple[Path, list[Path]]:
    base = save_model(build(), tmp_path / "base", 0, sharded)
    if tokenizer:
        tokenizer_into(base)
    tuned = [save_model(build(), tmp_path / f"ft{i}", i + 1, sharded) for i in range(2)]
    return base, tuned


def expected_merge(method, base: Path, tuned: list[Path]) -> dict[str, torch.Tensor]:
    src = open_source(base)
    return dict(merge_keys(get_method(method), src, [open_source(t) for t in tuned], src.keys()))


def assert_state_equal(model, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), key


@pytest.mark.parametrize(("sharded_in", "sharded_out"), [(False, False), (True, True), (True, False)])
def test_merged_hf_folder_loads_with_auto_model_and_auto_tokenizer(tmp_path, sharded_in, sharded_out):
    base, tuned = folders(tmp_path, tiny_bert, sharded_in)
    assert (base / "model.safetensors.index.json").is_file() == sharded_in
    out = tmp_path / "merged"
    record = merge_checkpoints("task_arithmetic", base, tuned, out, progress=False,
                               max_shard_size=8_000 if sharded_out else 5 * 2**30)
    model = transformers.AutoModel.from_pretrained(out)  # failed before: no config.json in the output
    assert_state_equal(model, expected_merge("task_arithmetic", base, tuned))
    assert transformers.AutoTokenizer.from_pretrained(out)("hello world merge")["input_ids"] == \
        transformers.AutoTokenizer.from_pretrained(base)("hello world merge")["input_ids"]
    copied = [name for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt")
              if (base / name).is_file()]
    assert "config.json" in copied and set(copied) <= set(record.outputs)
    assert record.outputs[-1] == "merge_record.json"
    assert sorted(record.outputs) == sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert ("model.safetensors.index.json" in record.outputs) == sharded_out


@pytest.mark.parametrize("sharded", [False, True])
def test_tied_embedding_decoder_keeps_the_tied_weight_once_and_reloads_tied(tmp_path, sharded):
    base, tuned = folders(tmp_path, tiny_llama, sharded, tokenizer=False)
    out = tmp_path / "merged"
    record = merge_checkpoints("tsv_m", base, tuned, out, progress=False, max_shard_size=8_000 if sharded else 2**30)
    assert sorted(open_source(out).keys()) == sorted(open_source(base).keys())
    assert "lm_head.weight" not in open_source(out).keys()  # the tied weight is stored once, as in the base
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    expected = expected_merge("tsv_m", base, tuned)
    assert_state_equal(model, expected)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, expected["model.embed_tokens.weight"])
    assert {"config.json", "generation_config.json"} <= set(record.outputs)


def lora_adapters(tmp_path: Path, base: Path) -> list[Path]:
    peft = pytest.importorskip("peft")
    adapters = []
    for i in range(2):
        model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base),
                                    peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=g))
        model.save_pretrained(tmp_path / f"adapter{i}")
        adapters.append(tmp_path / f"adapter{i}")
    return adapters


def test_adapters_merged_into_an_hf_base_load_with_their_tokenizer(tmp_path):
    base = save_model(tiny_llama(), tmp_path / "base", 0, sharded=False)
    tokenizer_into(base)
    out = tmp_path / "merged"
    record = merge_adapters_into_base("task_arithmetic", lora_adapters(tmp_path, base), base, out, prefix=None)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert_state_equal(model, {k: open_source(out).get_tensor(k) for k in open_source(out).keys()})
    assert transformers.AutoTokenizer.from_pretrained(out)("hello")["input_ids"]
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= set(record.outputs)
    assert len(record.merged_keys) == 2  # q_proj and v_proj of the one layer


def test_a_refused_model_file_fails_before_any_output(tmp_path):
    base, tuned = folders(tmp_path, tiny_bert, sharded=False, tokenizer=False)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the output")
    (base / "tokenizer.json").symlink_to(secret)
    with pytest.raises(ValueError, match=r"'tokenizer.json' in model folder .* link to .*secret.txt"):
        merge_checkpoints("average", base, tuned, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
