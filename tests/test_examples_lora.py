"""The LoRA example in its fast form: offline, a per-task table and one merged peft adapter folder."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TASKS = ("flip_lr", "flip_ud", "transpose", "anti_transpose")


def test_lora_merge_fast_prints_the_table_and_writes_the_merged_adapter(tmp_path):
    out = subprocess.run([sys.executable, "lora_merge.py", "--fast", "--out", str(tmp_path)], cwd=EXAMPLES,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert sum(line.startswith("[") and "LoRA-tuned" in line for line in lines) == len(TASKS)
    header = next(line for line in lines if line.startswith("accuracy"))
    assert all(column in header for column in ("base", "own adapter", "merged adapter"))
    for task in (*TASKS, "mean"):
        row = next(line for line in lines if line.startswith(task + " "))
        assert all(0.0 <= float(value) <= 1.0 for value in row.split()[1:]), row
    merged = tmp_path / "merge" / "merged_adapter"
    assert (merged / "adapter_config.json").is_file() and (merged / "adapter_model.safetensors").is_file()
    assert (tmp_path / "merge" / "task-03-anti_transpose" / "adapter_config.json").is_file()
