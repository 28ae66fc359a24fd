"""The LightningCLI example for real: one process per task (``LIGHTNING_MERGE_TASK``), the last one merges."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

FOLDER = Path(__file__).resolve().parents[1] / "examples" / "lightningcli"
TASKS = {"spam": 2, "sentiment": 3, "question": 6}


def fit(task: str, cwd: Path) -> str:
    env = {**os.environ, "LIGHTNING_MERGE_TASK": task, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(FOLDER / "fine_tune.py"), "fit", "--config", str(FOLDER / "config.yaml"),
                           "--trainer.max_steps", "2", "--data.batch_size", "4"], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_lightningcli_one_task_per_process_the_last_run_merges(tmp_path):
    merge = tmp_path / "runs" / "lightningcli" / "merge"
    outputs = [fit(task, tmp_path) for task in TASKS]
    assert "still missing: ['sentiment', 'question']" in outputs[0], outputs[0]
    assert "still missing: ['question']" in outputs[1], outputs[1]
    assert "MergeCallback: merged ['spam', 'sentiment', 'question']" in outputs[2], outputs[2]
    for task, classes in TASKS.items():
        assert f"{task} ({classes}, 384)" in outputs[2], outputs[2]
    manifest = json.loads((merge / "manifest.json").read_text())
    assert json.dumps(manifest).count("question") >= 1

    from transformers import AutoModel, AutoTokenizer

    encoder = AutoModel.from_pretrained(merge / "merged")
    assert encoder.config.hidden_size == 384 and encoder.config.num_hidden_layers == 6
    assert AutoTokenizer.from_pretrained(merge / "merged")("a question")["input_ids"][0] == 101  # [CLS]
