"""merge_adapters_into_base: the base weights plus the merged LoRA update, written atomically with a MergeRecord."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors.torch import save_file

from lightning_merge import merge_adapters_into_base
from lightning_merge.io import MergeRecord, open_source

KEY = "base_model.model.layers.0.proj"


def fake_adapter(folder: Path, seed: int, r: int) -> tuple[Path, torch.Tensor, torch.Tensor, float]:
    """What ``PeftModel.save_pretrained`` writes for one 16 x 12 layer; returns its folder, A, B and scale."""
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(r, 12, generator=g), torch.randn(16, r, generator=g)
    folder.mkdir()
    save_file({f"{KEY}.lora_A.weight": A, f"{KEY}.lora_B.weight": B}, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 4, "target_modules": ["proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder, A, B, 4 / r


@pytest.fixture
def setup(tmp_path):
    g = torch.Generator().manual_seed(9)
    base = {"layers.0.proj.weight": torch.randn(16, 12, generator=g), "layers.0.norm.weight": torch.ones(12),
            "step": torch.tensor(7)}
    (tmp_path / "base").mkdir()
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    (tmp_path / "base" / "config.json").write_text('{"model_type": "toy"}')
    adapters = [fake_adapter(tmp_path / f"a{t}", t, r) for t, r in enumerate((2, 3))]
    return {"base": base, "adapters": adapters, "tmp": tmp_path}


def test_task_arithmetic_equals_the_dense_update_computed_independently(setup):
    tmp, adapters = setup["tmp"], setup["adapters"]
    record = merge_adapters_into_base("task_arithmetic", [a[0] for a in adapters], tmp / "base", tmp / "out")
    dense = setup["base"]["layers.0.proj.weight"].double()
    dense = dense + 0.3 * sum(scale * B.double() @ A.double() for _, A, B, scale in adapters)
    merged = open_source(tmp / "out")
    assert sorted(merged.keys()) == sorted(setup["base"])
    assert torch.allclose(merged.get_tensor("layers.0.proj.weight").double(), dense, atol=1e-5, rtol=0)
    for key in ("layers.0.norm.weight", "step"):  # not adapted: copied bit for bit, in their dtype
        assert torch.equal(merged.get_tensor(key), setup["base"][key])
    assert record.merged_keys == ["layers.0.proj.weight"] and record.method == "task_arithmetic"
    assert (tmp / "out" / "config.json").read_text() == '{"model_type": "toy"}'
    assert sorted(p.name for p in tmp.iterdir()) == ["a0", "a1", "base", "out"]  # no temporary folder left


@pytest.mark.parametrize("algorithm", ["xxh3_128", "sha256"])
def test_the_record_lists_the_base_and_every_adapter_with_hashes(setup, algorithm):
    tmp, adapters = setup["tmp"], setup["adapters"]
    record = merge_adapters_into_base("tsv_m", [a[0] for a in adapters], tmp / "base", tmp / "out",
                                      input_hash=algorithm)
    loaded = MergeRecord.load(tmp / "out")
    assert loaded == record and loaded.outputs == ["model.safetensors", "config.json", "merge_record.json"]
    assert [i["role"] for i in loaded.inputs] == ["base", "adapter", "adapter"]
    digest = (lambda b: xxhash.xxh3_128(b).hexdigest()) if algorithm == "xxh3_128" else (
        lambda b: hashlib.sha256(b).hexdigest())
    files = [f for i in loaded.inputs for f in i["files"]]
    assert {Path(f["path"]).name for f in files} == {"model.safetensors", "adapter_config.json",
                                                     "adapter_model.safetensors"}
    assert len(files) == 5
    for entry in files:
        data = Path(entry["path"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["hash"] == f"{algorithm}:{digest(data)}"


def test_no_hash_and_output_dtype(setup):
    tmp, adapters = setup["tmp"], setup["adapters"]
    record = merge_adapters_into_base("average", [a[0] for a in adapters], tmp / "base", tmp / "out",
                                      input_hash=None, dtype="float64")
    assert all(f["hash"] is None for i in record.inputs for f in i["files"]) and record.dtype == "float64"
    merged = open_source(tmp / "out")
    assert merged.dtype("layers.0.proj.weight") == torch.float64 and merged.dtype("step") == torch.int64


def test_existing_output_and_output_inside_an_input_are_refused(setup):
    tmp, adapters = setup["tmp"], [a[0] for a in setup["adapters"]]
    (tmp / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        merge_adapters_into_base("average", adapters, tmp / "base", tmp / "out")
    with pytest.raises(ValueError, match="outside the inputs"):
        merge_adapters_into_base("average", adapters, tmp / "base", tmp / "base" / "merged", overwrite=True)
    with pytest.raises(ValueError, match="Expected argument `method` to be one of"):
        merge_adapters_into_base("ties", adapters, tmp / "base", tmp / "new")
    assert not (tmp / "new").exists() and not (tmp / "base" / "merged").exists()
    record = merge_adapters_into_base("average", adapters, tmp / "base", tmp / "out", overwrite=True)
    assert MergeRecord.load(tmp / "out") == record


def test_a_base_without_the_adapted_weight_is_refused(setup):
    tmp = setup["tmp"]
    save_file({"other.weight": torch.zeros(16, 12)}, str(tmp / "wrong.safetensors"))
    with pytest.raises(ValueError, match="'layers.0.proj.weight', which the adapter adapts"):
        merge_adapters_into_base("average", [a[0] for a in setup["adapters"]], tmp / "wrong.safetensors", tmp / "o")
    assert not (tmp / "o").exists()
