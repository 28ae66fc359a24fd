"""Hostile and careless peft adapter folders (issue 17, classes 6, 7 and 8): each is one error naming the file and
the field, from ``load_adapter`` and as one line from the command, before any merge work; patterns from the folder
are matched in bounded time, with peft's semantics for ordinary patterns."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from peft.utils.other import get_pattern_key

from lightning_merge.cli import main
from lightning_merge.lora import load_adapter, merge_adapters
from tests._robustness_helpers import ShellPayload, TouchPayload
from tests.test_lora import small_modules, write_adapter


def adapter(tmp_path, name="a", **config):
    return write_adapter(tmp_path / name, small_modules(), **config)


def cli_error(tmp_path, folders, capsys) -> str:
    argv = ["--finetuned", *map(str, folders), "--method", "average", "--output", str(tmp_path / "out"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-merge: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    return err


def set_config(folder, **fields):
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(fields)
    (folder / "adapter_config.json").write_text(json.dumps(config))


# --------------------------------------------------------------------------------------------- the config file
@pytest.mark.parametrize("text", ['{"peft_type": "LORA", "r": 2,', "", "\xff\xfe garbage"], ids=["cut", "empty",
                                                                                                "binary"])
def test_garbled_config_names_the_file(tmp_path, capsys, text):
    folder = adapter(tmp_path)
    (folder / "adapter_config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"Expected {folder / 'adapter_config.json'} to hold JSON, but it does not"):
        load_adapter(folder)
    assert "adapter_config.json" in cli_error(tmp_path, [folder, adapter(tmp_path, "b")], capsys)


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("r", "two", "a positive int"), ("r", None, "a positive int"), ("r", 0, "a positive int"),
    ("r", True, "a positive int"), ("r", 2.5, "a positive int"),
    ("lora_alpha", "16", "a finite number"), ("lora_alpha", None, "a finite number"),
    ("lora_alpha", float("nan"), "a finite number"), ("lora_alpha", [16], "a finite number"),
    ("use_rslora", "false", "true or false"), ("fan_in_fan_out", 1, "true or false"),
    ("rank_pattern", ["q"], "an object of module patterns"), ("alpha_pattern", "q", "an object of module patterns"),
    ("rank_pattern", {"q": "4"}, "a positive int"), ("alpha_pattern", {"q": None}, "a finite number"),
])
def test_config_field_of_the_wrong_type_names_the_field_and_the_file(tmp_path, capsys, field, value, expected):
    folder = adapter(tmp_path)
    set_config(folder, **{field: value})
    with pytest.raises(ValueError, match=rf"Expected `{field}(\[.*\])?` in .*adapter_config\.json to be {expected}"):
        load_adapter(folder)
    err = cli_error(tmp_path, [folder, adapter(tmp_path, "b")], capsys)
    assert f"`{field}" in err and "adapter_config.json" in err


def test_huge_lora_alpha_is_refused_instead_of_merging_to_zero(tmp_path):
    folder = adapter(tmp_path, lora_alpha=1e308)
    with pytest.raises(ValueError, match=r"`lora_alpha`/`alpha_pattern` in .*adapter_config\.json to give module"
                                         r" 'layers\.0\.q' an update .* within the range of torch\.float32"):
        load_adapter(folder)
    set_config(folder, lora_alpha=8, alpha_pattern={"v": -1e300})
    with pytest.raises(ValueError, match=r"module 'layers\.0\.v' an update"):
        load_adapter(folder)
    # a large scale that stays in range still merges, finitely
    set_config(folder, lora_alpha=1e20, alpha_pattern={})
    merged = merge_adapters("average", [folder, folder])
    assert all(torch.isfinite(m.delta()).all() for m in merged.modules.values())


# -------------------------------------------------------------------------------------------- the weights file
def test_truncated_adapter_weights_name_the_file(tmp_path, capsys):
    folder = adapter(tmp_path)
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(ValueError, match=rf"'{path}'"):
        load_adapter(folder)
    assert "adapter_model.safetensors" in cli_error(tmp_path, [folder, adapter(tmp_path, "b")], capsys)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
@pytest.mark.parametrize("payload", [TouchPayload, ShellPayload], ids=lambda c: c.__name__)
def test_malicious_adapter_bin_is_refused_without_running_it(tmp_path, capsys, payload, legacy):
    folder = write_adapter(tmp_path / "a", small_modules(), fmt="bin")
    marker = tmp_path / "pwned"
    tensors = torch.load(folder / "adapter_model.bin", weights_only=True)
    state = {**tensors, "payload": payload(marker)}
    if legacy:
        with open(folder / "adapter_model.bin", "wb") as f:
            pickle.dump(state, f)
    else:
        torch.save(state, folder / "adapter_model.bin")
    with pytest.raises(ValueError, match=rf"Refusing to load '{folder / 'adapter_model.bin'}'.*It was not executed"):
        load_adapter(folder)
    err = cli_error(tmp_path, [folder, adapter(tmp_path, "b")], capsys)
    assert "adapter_model.bin" in err and "It was not executed" in err
    assert not marker.exists()


def test_adapter_bin_that_is_not_a_torch_file_names_it(tmp_path, capsys):
    folder = write_adapter(tmp_path / "a", small_modules(), fmt="bin")
    (folder / "adapter_model.bin").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ValueError, match=r"'.*adapter_model\.bin' as a torch checkpoint"):
        load_adapter(folder)
    (folder / "adapter_model.bin").unlink()
    torch.save([1, 2], folder / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"'.*adapter_model\.bin' to hold a state dict of tensors"):
        load_adapter(folder)


# ---------------------------------------------------------------------------------------------- rank patterns
NAMES = ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.10.self_attn.q_proj",
         "model.layers.1.self_attn.xq_proj", "model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj")
PATTERNS = [
    {"q_proj": 4},  # a module name's last part
    {"model.layers.1.self_attn.q_proj": 4, "up_proj": 3},  # full names ('.' matches itself among others)
    {r"layers\.1\.self_attn\.q_proj": 5, "q_proj": 4},  # a regex, then a fallback: the first match wins
    {r"layers\.(0|10)\..*": 3, r".*_proj": 1},  # alternation and wildcards
    {"self_attn.q_proj": 2, "layers.2.mlp": 5},  # a middle part matches no module by itself: peft anchors at the end
]


@pytest.mark.parametrize("rank_pattern", PATTERNS, ids=range(len(PATTERNS)))
def test_rank_and_alpha_patterns_follow_peft(tmp_path, rank_pattern):
    """The reference is peft's own ``get_pattern_key``: each module's rank and alpha are what peft would use."""
    r, alpha_pattern = 6, {key: 2.0 * value for key, value in rank_pattern.items()}

    def peft_value(pattern, name, default):
        key = get_pattern_key(pattern.keys(), name)
        return pattern.get(key, default)

    g = torch.Generator().manual_seed(0)
    modules = {}
    for name in NAMES:
        rank = peft_value(rank_pattern, name, r)
        modules[name] = (torch.randn(8, rank, generator=g), torch.randn(rank, 8, generator=g))
    folder = write_adapter(tmp_path / "a", modules, r=r, lora_alpha=16, rank_pattern=rank_pattern,
                           alpha_pattern=alpha_pattern)
    loaded = load_adapter(folder)
    for name in NAMES:
        rank = peft_value(rank_pattern, name, r)
        assert loaded.modules[name].rank == rank
        assert loaded.modules[name].scale == pytest.approx(peft_value(alpha_pattern, name, 16) / rank)


def test_catastrophically_backtracking_pattern_is_refused_in_bounded_time(tmp_path, capsys):
    """``(a|aa)+`` on 80 a's then an x: ``re`` would try about 10**16 ways (32 a's already take a second)."""
    name = "m." + "a" * 80 + "x"
    g = torch.Generator().manual_seed(0)
    modules = {name: (torch.randn(8, 2, generator=g), torch.randn(2, 8, generator=g))}
    folder = write_adapter(tmp_path / "a", modules, r=2, rank_pattern={"(a|aa)+": 4})
    with pytest.raises(ValueError, match=r"`rank_pattern` key '\(a\|aa\)\+' in .*adapter_config\.json to match"
                                         r" module names quickly.*catastrophic backtracking"):
        load_adapter(folder)
    other = write_adapter(tmp_path / "b", modules, r=2)
    assert "rank_pattern" in cli_error(tmp_path, [folder, other], capsys)


@pytest.mark.parametrize("pattern", ["(unclosed", "x" * 2000], ids=["invalid", "too-long"])
def test_invalid_or_oversized_pattern_names_the_field(tmp_path, pattern):
    folder = adapter(tmp_path)
    set_config(folder, alpha_pattern={pattern: 4})
    with pytest.raises(ValueError, match=r"`alpha_pattern` key.* in .*adapter_config\.json|`alpha_pattern` keys in"):
        load_adapter(folder)



def test_adapter_weights_linked_from_outside_the_folder_are_refused(tmp_path):
    other = adapter(tmp_path, "elsewhere")
    folder = adapter(tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.safetensors").symlink_to(other / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"'adapter_model\.safetensors' \(the adapter's weights\) to be a file inside"
                                         r" the model folder .* but it links to .*elsewhere"):
        load_adapter(folder)
