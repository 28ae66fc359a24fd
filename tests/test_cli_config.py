"""The lightning-merge command on jsonargparse: YAML configs, switching method, relative paths, null, --print-config,
the ``merge`` subcommand and its flat alias."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import save_file

from lightning_merge import cli
from lightning_merge.cli import main
from lightning_merge.io import open_source
from lightning_merge.methods import get_method


@pytest.fixture
def folder(tmp_path):
    """A base and three fine-tuned safetensors files in ``tmp_path/ckpts``."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(6, generator=g)}
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    save_file(base, str(ckpts / "base.safetensors"))
    for t in range(3):
        save_file({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()},
                  str(ckpts / f"t{t}.safetensors"))
    return ckpts


def write_config(path, **values):
    path.write_text(yaml.safe_dump(values))
    return str(path)


def relative_config(folder, **values):
    """A config beside the checkpoints, naming them by relative paths."""
    return write_config(folder / "merge.yaml", base="base.safetensors", output="../out", quiet=True,
                        finetuned=[f"t{t}.safetensors" for t in range(3)], **values)


def expected(folder, method):
    base = open_source(folder / "base.safetensors")
    tuned = [open_source(folder / f"t{t}.safetensors") for t in range(3)]
    return {k: method(base.get_tensor(k), [t.get_tensor(k) for t in tuned]) for k in base.keys()}


def assert_merged(out, want):
    merged = open_source(out)
    assert sorted(merged.keys()) == sorted(want)
    for key, tensor in want.items():
        assert torch.equal(merged.get_tensor(key), tensor), key


def one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-merge: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_yaml_relative_paths_resolve_from_the_yaml_folder(folder, tmp_path, monkeypatch):
    config = relative_config(folder, method="average")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not the YAML's folder: the paths must not resolve from here
    assert main(["--config", config]) == 0
    assert_merged(tmp_path / "out", expected(folder, get_method("average")))
    assert not (elsewhere / "out").exists()
    record = json.loads((tmp_path / "out" / "merge_record.json").read_text())
    assert record["inputs"][0]["files"][0]["path"] == str(folder / "base.safetensors")


def test_command_line_relative_paths_resolve_from_the_working_directory(folder, tmp_path, monkeypatch):
    monkeypatch.chdir(folder)
    argv = ["--base", "base.safetensors", "--finetuned", "t0.safetensors", "t1.safetensors", "t2.safetensors",
            "--method", "average", "--output", "merged", "--quiet"]
    assert main(argv) == 0
    assert (folder / "merged" / "model.safetensors").is_file()


def test_switching_method_drops_the_yaml_option_the_new_method_does_not_take(folder, tmp_path, capsys):
    config = relative_config(folder, method="ties", density=0.5, scaling=0.7)
    assert main(["--config", config, "--method", "tsv_m", "--rank", "2"]) == 0
    record = json.loads((tmp_path / "out" / "merge_record.json").read_text())
    assert record["method"] == "tsv_m" and "density" not in record["options"]
    assert record["options"]["rank"] == 2 and record["scaling"] == 0.7  # options tsv_m takes are kept
    assert_merged(tmp_path / "out", expected(folder, get_method("tsv_m", rank=2, scaling=0.7)))


def test_an_option_the_method_does_not_take_is_refused_after_the_switch_or_in_the_same_yaml(folder, tmp_path, capsys):
    config = relative_config(folder, method="ties", density=0.5)
    assert "unknown ['density']" in one_line_error(["--config", config, "--method", "tsv_m", "--density", "0.3"],
                                                   capsys)
    same = relative_config(folder, method="tsv_m", density=0.5)
    assert "unknown ['density']" in one_line_error(["--config", same], capsys)
    assert not (tmp_path / "out").exists()


def test_a_flag_overrides_the_yaml_value_of_the_same_option(folder, tmp_path):
    config = relative_config(folder, method="ties", density=0.5)
    assert main(["--config", config, "--density", "0.25"]) == 0
    assert json.loads((tmp_path / "out" / "merge_record.json").read_text())["options"]["density"] == 0.25


def test_null_means_not_set(folder, tmp_path):
    config = relative_config(folder, method="task_arithmetic", scaling=None, weights=None, prefix=None, dtype=None)
    assert main(["--config", config]) == 0
    record = json.loads((tmp_path / "out" / "merge_record.json").read_text())
    assert record["scaling"] == 0.3 and record["options"]["weights"] is None  # task arithmetic's defaults
    assert main(["--config", config, "--method", "tsv_m", "--rank", "null", "--overwrite"]) == 0
    assert json.loads((tmp_path / "out" / "merge_record.json").read_text())["options"]["rank"] is None


def test_the_string_none_is_not_null(folder, capsys):
    err = one_line_error(["--config", relative_config(folder, method="tsv_m"), "--rank", "none"], capsys)
    assert "argument --rank: invalid value 'none': expected 'rank' to be an int, a float or null" in err


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"ranks": 3}, "unknown key 'ranks' in --config"),
        ({"max-shard-sise": "1MB"}, "unknown key 'max_shard_sise' in --config"),
        ({"rank": "big"}, "argument --rank: invalid value 'big': expected 'rank' to be an int, a float or null"),
        ({"density": [0.5]}, "argument --density: invalid value"),
        ({"solver": "magic"}, "expected 'solver' to be one of ['auto', 'exact', 'randomized'] or null"),
        ({"finetuned": 3}, "argument --finetuned: invalid value"),
        ({"overwrite": "yes"}, "argument --overwrite: invalid value 'yes': expected 'overwrite' to be true or false"),
        ({"max_shard_size": "huge"}, "expected 'max_shard_size' to be a size such as 5GB"),
        ({"dtype": "float8"}, "expected 'dtype' to be one of ['bfloat16', 'float16', 'float32', 'float64'] or null"),
        ({"method": "nope"}, "argument --method: invalid value 'nope'"),
    ],
)
def test_unknown_keys_and_wrong_types_are_one_line_errors_naming_the_key(folder, tmp_path, capsys, values, message):
    config = {"base": "base.safetensors", "finetuned": ["t0.safetensors"], "method": "tsv_m", "output": "o", **values}
    err = one_line_error(["--config", write_config(folder / "bad.yaml", **config)], capsys)
    assert message in err, err
    assert not (folder / "o").exists()


def test_unknown_flag_is_a_one_line_error(capsys):
    assert "unrecognized arguments: --ranks 3" in one_line_error(["--ranks", "3"], capsys)


def test_print_config_fed_back_gives_the_same_run(folder, tmp_path, capsys):
    config = relative_config(folder, method="ties", density=0.5, exclude=[], max_shard_size="1KB")
    assert main(["--config", config, "--method", "sftm", "--rank", "0.5", "--print-config"]) == 0
    printed = capsys.readouterr().out
    effective = yaml.safe_load(printed)
    assert effective["method"] == "sftm" and effective["rank"] == 0.5 and effective["density"] is None
    assert effective["base"] == str(folder / "base.safetensors") and effective["max_shard_size"] == 1000
    assert effective["strict"] is True and effective["hash"] == "xxh3_128"  # the defaults are shown
    assert not (tmp_path / "out").exists()  # printed, not run
    (tmp_path / "effective.yaml").write_text(printed)
    assert main(["--config", str(tmp_path / "effective.yaml"), "--output", str(tmp_path / "again")]) == 0
    assert main(["--config", config, "--method", "sftm", "--rank", "0.5"]) == 0
    want = expected(folder, get_method("sftm", rank=0.5))
    assert_merged(tmp_path / "again", want)
    assert_merged(tmp_path / "out", want)
    assert sorted(os.listdir(tmp_path / "again")) == sorted(os.listdir(tmp_path / "out"))  # the same shards


@pytest.mark.parametrize("command", [["merge"], []], ids=["merge", "flat"])
def test_merge_subcommand_and_flat_alias(folder, tmp_path, capsys, command):
    argv = [*command, "--base", str(folder / "base.safetensors"), "--finetuned",
            *(str(folder / f"t{t}.safetensors") for t in range(3)), "--method", "tsv_m", "--rank", "1",
            "--output", str(tmp_path / "out")]
    assert main(argv) == 0
    assert "merged 2 keys of 3 checkpoints with tsv_m" in capsys.readouterr().out
    assert_merged(tmp_path / "out", expected(folder, get_method("tsv_m", rank=1)))


def test_merge_help_is_the_flat_help(capsys):
    assert main(["merge", "--help"]) == 0
    merge_help = capsys.readouterr().out
    assert main(["--help"]) == 0
    assert capsys.readouterr().out == merge_help and "--print-config" in merge_help and "Commands: merge" in merge_help


def test_keyboard_interrupt_exits_130(folder, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "merge_checkpoints", interrupted)
    assert main(["--config", relative_config(folder, method="average")]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_defaults_are_the_python_api_defaults():
    from lightning_merge.engine import merge_checkpoints

    defaults = cli.build_parser().get_defaults()
    signature = __import__("inspect").signature(merge_checkpoints).parameters
    for key in ("strict", "overwrite", "prefix", "base_prefix", "max_shard_size", "dtype"):
        assert defaults[key] == signature[key].default, key
    assert defaults["hash"] == signature["input_hash"].default and list(defaults["exclude"]) == list(
        signature["exclude"].default)


# ------------------------------------------------------------------ untrusted configs (issue 17, classes 6 and 8)


def laughs(levels: int) -> str:
    """A billion-laughs YAML: each level an alias list of nine of the previous one (9**levels strings)."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join([*lines, f"finetuned: *a{levels - 1}", "base: base.safetensors", "method: average"]) + "\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (laughs(6), "expected a config of at most 10000 values once aliases are expanded"),
        ("finetuned: &a [t0.safetensors, *a]\n", "expected a config without recursive aliases"),
        ("method: average\nrank: 1\nrank: 2\n", "expected each key once, but 'rank' is given twice"),
        ("max-shard-size: 1MB\nmax_shard_size: 2MB\n", "expected each key once, but 'max_shard_size' is given twice"),
        ("finetuned: " + "[" * 40 + "]" * 40 + "\n", "expected a config nested at most 16 levels deep"),
        ("[" * 5000 + "]" * 5000 + "\n", "expected a config nested at most 16 levels deep"),
        ("a: &a " + "[" * 12 + "]" * 12 + "\nb: " + "[" * 6 + "*a" + "]" * 6 + "\n",
         "expected a config nested at most 16 levels deep"),
        ("exclude: {a: 1}\n", "expected 'exclude' to be a list of patterns, but got a mapping"),
        ("finetuned: [[t0.safetensors]]\n", "expected 'finetuned' to be a list of paths, but got a nested list"),
        ("base: {path: base.safetensors}\n", "expected 'base' to be a path, but got a mapping"),
        ("rank: " + "9" * 5000 + "\n", "expected values of at most 4096 characters, but the one at line 1 has 5000"),
        ("base: !!python/object/apply:os.system [ls]\n", "could not determine a constructor"),
        ("base: !custom x\n", "could not determine a constructor for the tag '!custom'"),
        ("method: average\n---\nmethod: ties\n", "expected a single document"),
        ("- base.safetensors\n", "expected --config to hold a mapping"),
        ("exclude: ['" + "a" * 2000 + "']\n", "argument --exclude: invalid value"),
    ],
    ids=["billion-laughs", "recursive-alias", "duplicate-key", "duplicate-after-dash", "deep", "very-deep",
         "deep-through-an-alias", "mapping-for-list", "nested-list", "mapping-for-path", "huge-int", "python-tag",
         "custom-tag", "two-documents", "top-level-list", "long-pattern"],
)
def test_hostile_configs_are_one_line_errors_before_any_work(folder, capsys, text, message):
    (folder / "bad.yaml").write_text(text)
    err = one_line_error(["--config", str(folder / "bad.yaml"), "--output", str(folder / "o")], capsys)
    assert message in err and len(err) < 600, err[:600]  # a billion laughs printed 9**6 strings before
    assert not (folder / "o").exists()


def test_a_config_file_over_the_size_limit_is_refused_before_it_is_read(folder, tmp_path, capsys):
    config = relative_config(folder, method="average")
    with open(config, "a") as handle:  # a valid config padded with comments past 1 MiB: it ran before
        handle.write(("#" * 1023 + "\n") * 1025)
    err = one_line_error(["--config", config], capsys)
    assert "expected a file of at most 1048576 bytes" in err
    assert not (tmp_path / "out").exists()


def test_yaml_null_output_is_not_set_and_makes_no_folder(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(folder / "null.yaml", base="base.safetensors", finetuned=["t0.safetensors"],
                          method="average", output=None)
    assert "the following arguments are required: --output" in one_line_error(["--config", config], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpts"] and not (folder / "None").exists()
