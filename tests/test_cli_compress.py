"""``lightning-merge compress``: flags, YAML config, --print-config, and one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from lightning_merge import functional as F
from lightning_merge.cli import main
from lightning_merge.compress import load_compressed


@pytest.fixture
def files(tmp_path) -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    base = {"layer.weight": torch.randn(12, 10, generator=g), "layer.bias": torch.randn(12, generator=g),
            "head.weight": torch.randn(2, 10, generator=g)}
    tuned = []
    for name in ("alpha", "beta"):
        state = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, tmp_path / f"{name}.ckpt")
        tuned.append(state)
    save_file(base, str(tmp_path / "base.safetensors"))
    argv = ["--base", str(tmp_path / "base.safetensors"), "--finetuned", str(tmp_path / "alpha.ckpt"),
            str(tmp_path / "beta.ckpt"), "--prefix", "model.", "--base-prefix", "", "--output", str(tmp_path / "out")]
    return {"base": base, "tuned": tuned, "argv": argv}


def run_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-merge: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_compress_from_flags(tmp_path, files, capsys):
    argv = ["compress", *files["argv"], "--rank", "3", "--format", "both", "--exclude", "head.*", "--quiet"]
    assert main(argv) == 0
    assert capsys.readouterr().out == ""
    record = json.loads((tmp_path / "out" / "merge_record.json").read_text())
    assert record["method"] == "tsv_c" and record["tasks"] == ["alpha", "beta"]
    assert record["options"]["rank"] == 3 and record["excluded_keys"] == ["head.weight"]
    assert 0 < record["compression"]["ratio"] < 1
    deltas = load_compressed(tmp_path / "out" / "beta")
    d = files["tuned"][1]["layer.weight"] - files["base"]["layer.weight"]
    assert torch.allclose(deltas["layer.weight"], F.tsv_c(d, rank=3).dense(), atol=1e-6)
    assert (tmp_path / "out" / "alpha" / "adapter_config.json").is_file()


def test_names_energy_and_summary(tmp_path, files, capsys):
    argv = ["compress", *files["argv"], "--names", "a", "b", "--energy", "0.9", "--format", "safetensors",
            "--hash", "none"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("compressed 3 keys of 2 checkpoints with tsv_c") and "ratio" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a", "b", "merge_record.json"]
    record = json.loads((tmp_path / "out" / "merge_record.json").read_text())
    assert record["options"]["energy"] == 0.9 and record["inputs"][0]["files"][0]["hash"] is None


def test_config_file_and_print_config(tmp_path, files, capsys):
    config = {"base": "base.safetensors", "finetuned": ["alpha.ckpt", "beta.ckpt"], "prefix": "model.",
              "base_prefix": "", "output": "from_yaml", "rank": 0.5, "format": "safetensors"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["compress", "--config", str(tmp_path / "c.yaml"), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["rank"] == 0.5 and printed["output"] == str(tmp_path / "from_yaml")  # resolved from the YAML
    (tmp_path / "printed.yaml").write_text(yaml.safe_dump(printed))
    assert main(["compress", "--config", str(tmp_path / "printed.yaml"), "--rank", "2", "--quiet"]) == 0
    record = json.loads((tmp_path / "from_yaml" / "merge_record.json").read_text())
    assert record["options"]["rank"] == 2 and record["compression"]["tasks"]["alpha"]["ranks"]["layer.weight"] == 2


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--rank", "0"], "`rank` to be None, a positive int"),
        (["--rank", "2", "--energy", "0.9"], "at most one of the arguments `rank` and `energy`"),
        (["--energy", "2"], "`energy` to be None or a float in"),
        (["--format", "lora"], "argument --format: invalid value 'lora'"),
        (["--names", "a"], "one --names entry per --finetuned path"),
        (["--names", "a", "../b"], "task name 1 to be a name without path separators"),
        (["--names", "x", "X"], "distinct task names"),
        (["--bogus", "1"], "bogus"),
        (["--exclude", "a" * 2000], "argument --exclude: invalid value"),  # a key pattern, not a program
    ],
)
def test_bad_input_is_one_line_naming_the_key(tmp_path, files, capsys, extra, match):
    err = run_error(["compress", *files["argv"], *extra, "--quiet"], capsys)
    assert match in err
    assert not (tmp_path / "out").exists()


def test_missing_arguments_and_bad_config_keys(tmp_path, files, capsys):
    assert "required: --finetuned, --output" in run_error(["compress", "--base", "b.safetensors"], capsys)
    (tmp_path / "bad.yaml").write_text("base: base.safetensors\nmethod: tsv_m\n")
    assert "unknown key 'method' in --config" in run_error(["compress", "--config", str(tmp_path / "bad.yaml")],
                                                           capsys)
    err = run_error(["compress", *files["argv"][:-2], "--output", str(tmp_path / "base.safetensors")], capsys)
    assert "folder path" in err


def test_merge_is_still_the_default_command(tmp_path, files, capsys):
    argv = [*files["argv"], "--method", "average", "--quiet"]
    assert main(argv) == 0 and (tmp_path / "out" / "model.safetensors").is_file()
