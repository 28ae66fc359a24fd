"""Merging checkpoints that already exist, with the ``lightning-merge`` command and a YAML file.

    python examples/cli_merge.py [--fast] [--out runs/cli_merge] [--config examples/merge.yaml]

1. The config (``examples/merge.yaml``) is copied into ``--out``: the command resolves the relative paths of a
   config from the config's folder. The checkpoints it names (a pre-trained digits model and fine-tunes named after
   digits tasks) are written first when they do not exist: one ordinary ``Trainer.fit`` each, saved as Lightning
   ``.ckpt`` files with ``trainer.save_checkpoint``.
2. The real console command merges them twice, in ``--out``:
   ``lightning-merge merge --config merge.yaml`` (TSV-M, as configured), then the same config with flags that
   override it, ``--method task_arithmetic --output merged/task_arithmetic``.
3. Each merged output folder (sharded safetensors, an index and ``merge_record.json``) is loaded back into the model
   and every task is scored on its test split with its own head (the heads are excluded from the merge), next to
   the pre-trained model and the task's own fine-tune.

About 30 s with ``--fast`` on 2 CPU cores, about a minute without.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml
from digits import TASKS, DigitNet, Digits

from lightning_merge.io import open_source

OVERRIDE = ["--method", "task_arithmetic", "--output", "merged/task_arithmetic"]


def trainer(out: Path, steps: int) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=out)


def config_paths(config: Path, out: Path) -> tuple[Path, dict[str, Path]]:
    """The config's base and ``{task: fine-tune}``, resolved from ``out``; the fine-tunes are named after tasks."""
    values = yaml.safe_load(config.read_text())
    tasks = {Path(p).stem: out / p for p in values["finetuned"]}
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise SystemExit(f"{config}: fine-tunes must be named after digits tasks {list(TASKS)}, but got {unknown}")
    return out / values["base"], tasks


def make_checkpoints(data: Digits, base: Path, tasks: dict[str, Path], steps: tuple[int, int]) -> None:
    """Pre-train on the four rotations, then fine-tune each task from it; every model saved as a Lightning .ckpt."""
    base.parent.mkdir(parents=True, exist_ok=True)
    model = DigitNet(lr=1e-3)
    fit = trainer(base.parent, steps[0])
    fit.fit(model, data.pretrain_loader())
    fit.save_checkpoint(base)
    for task, path in tasks.items():
        model = DigitNet.load_from_checkpoint(base, lr=5e-4)
        fit = trainer(path.parent, steps[1])
        fit.fit(model, data.loader(task, "train", shuffle=True))
        fit.save_checkpoint(path)
        print(f"wrote {path}")


def lightning_merge(args: list[str], cwd: Path) -> None:
    """Run the installed command (``python -m lightning_merge.cli`` is the ``lightning-merge`` entry point)."""
    print(f"$ cd {cwd} && lightning-merge {shlex.join(args)}", flush=True)
    done = subprocess.run([sys.executable, "-m", "lightning_merge.cli", *args], cwd=cwd, text=True,
                          capture_output=True)
    print(done.stdout.strip())
    if done.returncode != 0:
        raise SystemExit(f"lightning-merge failed ({done.returncode}): {done.stderr.strip()}")


def read_state(path: Path) -> dict[str, torch.Tensor]:
    source = open_source(path)
    return {key: source.get_tensor(key) for key in source.keys()}


@torch.no_grad()
def accuracy(state: dict[str, torch.Tensor], data: Digits, task: str) -> float:
    model = DigitNet()
    model.load_state_dict(state)
    model.eval()
    x, y = data.dataset(task, "test").tensors
    return (model(x).argmax(dim=1) == y).float().mean().item()


def table(data: Digits, base: Path, tasks: dict[str, Path], merged: dict[str, Path]) -> str:
    """Test accuracy per task: pre-trained, own fine-tune, and each merged body with the task's own head."""
    pretrained = read_state(base)
    columns = {"pretrained": {}, "fine-tuned": {}, **{name: {} for name in merged}}
    merged_states = {name: read_state(folder) for name, folder in merged.items()}
    for task, path in tasks.items():
        finetuned = read_state(path)
        head = {k: v for k, v in finetuned.items() if k.startswith("head.")}
        columns["pretrained"][task] = accuracy(pretrained, data, task)
        columns["fine-tuned"][task] = accuracy(finetuned, data, task)
        for name, state in merged_states.items():
            columns[name][task] = accuracy({**state, **head}, data, task)
    lines = [f"{'task':<16}" + "".join(f"{c:>17}" for c in columns)]
    lines += [f"{t:<16}" + "".join(f"{columns[c][t]:17.3f}" for c in columns) for t in tasks]
    lines.append(f"{'mean':<16}" + "".join(f"{sum(v.values()) / len(v):17.3f}" for v in columns.values()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="fewer training steps (about 30 s)")
    parser.add_argument("--out", type=Path, default=Path("runs/cli_merge"), help="where the files are (written)")
    parser.add_argument("--config", type=Path, default=Path(__file__).with_name("merge.yaml"),
                        help="the lightning-merge YAML config, copied into --out (paths relative to --out)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    pl.seed_everything(args.seed, verbose=False)
    out, source = args.out.absolute(), args.config.absolute()
    out.mkdir(parents=True, exist_ok=True)
    config = out / "merge.yaml"  # relative paths in a config are resolved from its folder: --out
    if source != config:
        shutil.copyfile(source, config)
    base, tasks = config_paths(config, out)
    data = Digits(seed=args.seed)
    if not all(p.is_file() for p in [base, *tasks.values()]):
        make_checkpoints(data, base, tasks, (150, 30) if args.fast else (1500, 300))
    lightning_merge(["merge", "--config", config.name], cwd=out)
    lightning_merge(["merge", "--config", config.name, *OVERRIDE], cwd=out)
    output = out / yaml.safe_load(config.read_text())["output"]
    merged = {"tsv_m": output, "task_arithmetic": out / OVERRIDE[-1]}
    print(f"merged folders: {', '.join(sorted(p.name for p in output.iterdir()))}")
    print(table(data, base, tasks, merged))


if __name__ == "__main__":
    main()
