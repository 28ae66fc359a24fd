"""The lightning-merge command on peft LoRA adapter folders: a merged adapter, or the base plus the merged update."""

from __future__ import annotations

import pytest
import torch
import yaml

from lightning_merge.cli import main
from lightning_merge.io import MergeRecord
from lightning_merge.lora import load_adapter, merge_adapters, merge_into_base
from lightning_merge.methods import get_method

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def tiny_llama():
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=4, vocab_size=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def random_adapter(folder, seed, r):
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=r, lora_alpha=8, target_modules=TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli_lora")
    tiny_llama().save_pretrained(tmp / "base")
    adapters = [random_adapter(tmp / f"a{t}", t, r) for t, r in enumerate((2, 4, 3))]
    return {"base": str(tmp / "base"), "adapters": adapters}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def run_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-merge: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_adapters_merge_into_one_adapter_without_base(inputs, tmp_path, capsys):
    argv = ["--finetuned", *inputs["adapters"], "--method", "tsv_m", "--rank", "2", "--scaling", "0.8",
            "--output", str(tmp_path / "out")]
    assert main(argv) == 0
    assert "merged 5 LoRA modules of 3 adapters with tsv_m" in capsys.readouterr().out
    expected = merge_adapters(get_method("tsv_m", rank=2, scaling=0.8), inputs["adapters"])
    written = load_adapter(tmp_path / "out")
    for name, module in expected.modules.items():
        assert torch.equal(written.modules[name].lora_A, module.lora_A)
        assert torch.equal(written.modules[name].lora_B, module.lora_B)
    ids = torch.randint(0, 64, (2, 7))
    via_peft = logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "out").eval(), ids)
    reference = tiny_llama()
    reference.load_state_dict(merge_into_base(expected, reference), strict=False)
    assert torch.allclose(via_peft, logits(reference, ids), atol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


def test_merge_into_base_writes_a_loadable_model(inputs, tmp_path):
    argv = ["--base", inputs["base"], "--finetuned", *inputs["adapters"], "--method", "sftm", "--merge-into-base",
            "--output", str(tmp_path / "model"), "--quiet"]
    assert main(argv) == 0
    assert main(["--finetuned", *inputs["adapters"], "--method", "sftm", "--output", str(tmp_path / "ad"),
                 "--quiet"]) == 0
    ids = torch.randint(0, 64, (2, 7))
    merged_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "model").eval()
    via_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ad").eval()
    assert torch.allclose(logits(merged_model, ids), logits(via_peft, ids), atol=1e-4)
    record = MergeRecord.load(tmp_path / "model")  # the one record schema, with every input hashed
    assert record.method == "sftm" and [i["role"] for i in record.inputs] == ["base", "adapter", "adapter", "adapter"]
    assert all(f["hash"].startswith("xxh3_128:") for i in record.inputs for f in i["files"])
    assert (tmp_path / "model" / "config.json").is_file()


def test_yaml_config_equals_flags(inputs, tmp_path):
    config = {"finetuned": inputs["adapters"], "method": "task_arithmetic", "scaling": 0.5, "compact": True,
              "dtype": "float64", "output": str(tmp_path / "yaml")}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    assert main(["--config", str(tmp_path / "merge.yaml"), "--quiet"]) == 0
    assert main(["--finetuned", *inputs["adapters"], "--method", "task_arithmetic", "--scaling", "0.5", "--compact",
                 "--dtype", "float64", "--output", str(tmp_path / "flags"), "--quiet"]) == 0
    a, b = load_adapter(tmp_path / "yaml"), load_adapter(tmp_path / "flags")
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert next(iter(a.modules.values())).lora_A.dtype == torch.float64
    assert a.modules["model.layers.0.mlp.up_proj"].rank <= 2 + 4 + 3


def test_existing_output_is_refused_unless_overwrite(inputs, tmp_path, capsys):
    argv = ["--finetuned", *inputs["adapters"], "--method", "average", "--output", str(tmp_path / "out"), "--quiet"]
    (tmp_path / "out").mkdir()
    assert "already exists" in run_error(argv, capsys)
    assert main([*argv, "--overwrite"]) == 0 and (tmp_path / "out" / "adapter_config.json").is_file()


def test_mixed_inputs_name_the_offending_path(inputs, tmp_path, capsys):
    torch.save({"w": torch.zeros(2)}, tmp_path / "full.ckpt")
    argv = ["--finetuned", inputs["adapters"][0], str(tmp_path / "full.ckpt"), "--method", "average",
            "--output", str(tmp_path / "out")]
    assert f"but {str(tmp_path / 'full.ckpt')!r} is not" in run_error(argv, capsys)
    argv = ["--base", str(tmp_path / "full.ckpt"), "--finetuned", str(tmp_path / "full.ckpt"), inputs["adapters"][1],
            "--method", "average", "--output", str(tmp_path / "out")]
    assert f"but {inputs['adapters'][1]!r} is a peft adapter folder" in run_error(argv, capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--method", "ties"], "Expected argument `method` to be one of"),
        (["--method", "tsv_m", "--merge-into-base"], "--merge-into-base needs --base"),
        (["--method", "tsv_m", "--exclude", "lm_head"], "Expected no --exclude with peft adapter folders"),
    ],
)
def test_adapter_errors_are_one_line(inputs, tmp_path, capsys, extra, match):
    argv = ["--finetuned", *inputs["adapters"], "--output", str(tmp_path / "out"), *extra]
    assert match in run_error(argv, capsys)
    assert list(tmp_path.iterdir()) == []


def test_adapter_options_are_refused_for_checkpoints_and_base_stays_required(tmp_path, capsys):
    torch.save({"w": torch.zeros(2)}, tmp_path / "a.ckpt")
    argv = ["--base", str(tmp_path / "a.ckpt"), "--finetuned", str(tmp_path / "a.ckpt"), "--method", "average",
            "--output", str(tmp_path / "out")]
    assert "--merge-into-base applies to peft adapter folders only" in run_error([*argv, "--merge-into-base"], capsys)
    assert "required: --base" in run_error(argv[2:], capsys)


def test_output_inside_an_input_adapter_is_refused(inputs, capsys):
    argv = ["--finetuned", *inputs["adapters"], "--method", "average", "--output", inputs["adapters"][0],
            "--overwrite"]
    err = run_error(argv, capsys)
    assert "to be outside the inputs" in err and f"holds the input {inputs['adapters'][0]!r}" in err
    assert load_adapter(inputs["adapters"][0]).config["r"] == 2
