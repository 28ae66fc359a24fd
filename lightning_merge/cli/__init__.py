"""The ``lightning-merge`` command: merge checkpoints or peft LoRA adapters on disk with any registered method.

Usage::

    lightning-merge merge --base B --finetuned F1 F2 F3 --method tsv_m --rank 0.125 --exclude 'head.*' --output OUT
    lightning-merge merge --config merge.yaml --method task_arithmetic --output OUT2   # flags after --config win
    lightning-merge merge --config merge.yaml --print-config > effective.yaml           # the effective configuration
    lightning-merge merge --finetuned ADAPTER1 ADAPTER2 --method tsv_m --output MERGED_ADAPTER
    lightning-merge merge --finetuned ADAPTER1 ADAPTER2 --method tsv_m --merge-into-base --base BASE --output MODEL
    lightning-merge compress --base BASE --finetuned F1 F2 [--names a b] --rank 0.1 --format both --output OUT

``merge`` is the default command: ``lightning-merge --base B ...`` (no command name) is the same as
``lightning-merge merge --base B ...``. ``lightning-merge compress --base B --finetuned A B --rank 0.1 --output OUT``
compresses each fine-tune with TSV-C instead (:mod:`lightning_merge.cli.compress`), with the same conventions.
The parser is jsonargparse's (the one ``LightningCLI`` uses):

* ``--config merge.yaml`` holds the same arguments under the same names (``finetuned: [F1, F2]``, ``rank: 0.125``,
  ``max_shard_size: 2GB``, ``strict: false``; ``-`` or ``_`` in names), type-checked like the flags; flags after
  ``--config`` override it, and ``--print-config`` prints the effective configuration as YAML (which, given back with
  ``--config``, runs the same merge).
* Relative paths (``base``, ``finetuned``, ``output``) in a YAML file are resolved from the YAML file's folder; on the
  command line, from the working directory.
* ``null`` means "not set": a method option set to ``null`` takes the method's default, as does one left out.
* Method options (``--rank``, ``--density``, ...) come from the method classes' typed fields
  (:mod:`lightning_merge.methods`). A ``--method`` flag unsets the method options set before it (by a ``--config``
  file or an earlier flag) that the new method does not take, so ``--config ties.yaml --method tsv_m`` drops the
  YAML's ``density``; an option set after ``--method``, or in the same YAML file as ``method``, that the method does
  not take is an error.
* When every ``--finetuned`` path is a peft LoRA adapter folder (it holds ``adapter_config.json``), the adapters are
  merged in low-rank form (:func:`~lightning_merge.lora.merge_adapters`) into one peft adapter folder, or with
  ``--merge-into-base`` into the ``--base`` weights (:func:`~lightning_merge.lora.merge_adapters_into_base`);
  ``--base`` is then needed only for ``--merge-into-base``.

Many processes: ``torchrun --nproc-per-node N -m lightning_merge ...`` (or ``lightning-merge`` under ``srun``, with
``MASTER_ADDR`` and ``MASTER_PORT`` exported) merges on ``N`` ranks into one output, bitwise the one-process output
(see :func:`run`); ``--device cuda`` is each rank's local GPU. A rank that stopped because another failed prints
``lightning-merge: error: rank R failed: <its message>`` and exits with code 1; only rank 0 prints the summary.

Bad input (an unknown key, a value of the wrong type, a missing file...) ends with one line
``lightning-merge: error: <reason>`` on stderr, naming the key, and exit code 2; Ctrl-C with exit code 130.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Sequence

from jsonargparse import Namespace

from lightning_merge.cli.compress import build_compress_parser, run_compress
from lightning_merge.cli.parser import (
    PROG,
    UsageError,
    build_parser,
    check_required,
    is_adapter_folder,
    method_from,
    parse_args,
    parse_size,
)
from lightning_merge.engine import DTYPES, merge_checkpoints
from lightning_merge.engine.distributed import Launch, RankFailedError, launch_from_env, session
from lightning_merge.functional._checks import HintedError
from lightning_merge.lora import merge_adapters, merge_adapters_into_base

__all__ = ["build_compress_parser", "build_parser", "main", "parse_args", "parse_size", "run", "run_compress"]

# ------------------------------------------------------------------------------------------------ run


def _shown(output: str) -> str:
    """``output`` relative to the working directory when it lies inside it (for the summary line)."""
    relative = os.path.relpath(output)
    return output if relative.startswith("..") else relative


def run(cfg: Namespace) -> str:
    """Run the merge described by parsed arguments; returns the one-line summary (empty on ranks but 0).

    Launched in many processes (``torchrun``, SLURM: :func:`~lightning_merge.engine.distributed.launch_from_env`),
    every rank merges its share of the keys into the one output (``merge_checkpoints(..., distributed=True)``);
    the summary then names the number of ranks. Adapters (merged in memory, in one step) are refused there.
    """
    check_required(cfg)
    launch = launch_from_env()
    if _adapter_inputs(cfg.finetuned):
        _check_one_process(launch, "merging peft adapters")
        return run_adapters(cfg)
    for flag in ("merge_into_base", "compact"):
        if cfg[flag]:
            raise ValueError(f"--{flag.replace('_', '-')} applies to peft adapter folders only, but --finetuned"
                             " holds checkpoints.")
    with contextlib.ExitStack() as stack:
        device = cfg.device if launch is None else stack.enter_context(session(launch, cfg.device))
        record = merge_checkpoints(
            method_from(cfg), cfg.base, cfg.finetuned, cfg.output, exclude=cfg.exclude, strict=cfg.strict,
            device=device, dtype=cfg.dtype, overwrite=cfg.overwrite, progress=not cfg.quiet,
            max_shard_size=cfg.max_shard_size, prefix=cfg.prefix, base_prefix=cfg.base_prefix,
            input_hash=None if cfg.hash == "none" else cfg.hash, distributed=launch is not None,
        )
    if launch is not None and launch.rank != 0:
        return ""  # the summary is rank 0's
    ranks = "" if launch is None else f" on {launch.world_size} ranks"
    return (
        f"merged {len(record.merged_keys)} keys of {len(cfg.finetuned)} checkpoints with {record.method} into"
        f" {_shown(cfg.output)} ({len(record.excluded_keys)} excluded, {len(record.skipped)} skipped) in"
        f" {record.seconds:.1f} s{ranks}"
    )


def _check_one_process(launch: Launch | None, what: str) -> None:
    """Refuse a launch of many processes for ``what``, which runs in one (every rank would write the output)."""
    if launch is not None:
        raise ValueError(
            f"Expected one process for {what}, but this is rank {launch.rank} of {launch.world_size} (WORLD_SIZE or"
            " SLURM_STEP_NUM_TASKS). HINT: run it without torchrun or srun; only merging checkpoints uses many"
            " processes."
        )


def _adapter_inputs(paths: Sequence[str]) -> bool:
    """Whether the inputs are adapter folders (all) or checkpoints (none); a mix is refused, naming the odd path."""
    kinds = [is_adapter_folder(path) for path in paths]
    if all(kinds) or not any(kinds):
        return kinds[0]
    odd = next(p for p, kind in zip(paths, kinds, strict=True) if kind != kinds[0])
    first = "a peft adapter folder" if kinds[0] else "a checkpoint"
    raise ValueError(
        f"Expected every --finetuned path to be {first} like {paths[0]!r}, but {odd!r} is"
        f" {'not' if kinds[0] else 'a peft adapter folder'}. HINT: merge adapters and full checkpoints separately,"
        " or merge the adapters into the base first."
    )


def run_adapters(cfg: Namespace) -> str:
    """Merge peft adapter folders into ``--output``: one adapter, or the base weights plus the merged update."""
    _check_adapter_args(cfg)
    method = method_from(cfg)
    if cfg.merge_into_base:
        record = merge_adapters_into_base(
            method, cfg.finetuned, cfg.base, cfg.output, prefix=cfg.base_prefix if cfg.base_prefix is not None
            else cfg.prefix, dtype=cfg.dtype, compact=cfg.compact, max_shard_size=cfg.max_shard_size,
            overwrite=cfg.overwrite, input_hash=None if cfg.hash == "none" else cfg.hash, progress=not cfg.quiet,
        )
        return (f"merged {len(record.merged_keys)} LoRA modules of {len(cfg.finetuned)} adapters with"
                f" {method.name} into {_shown(cfg.output)} (the base weights plus the merged update)")
    dtype = DTYPES[cfg.dtype] if cfg.dtype is not None else None
    adapter = merge_adapters(method, cfg.finetuned, cfg.output, dtype=dtype, compact=cfg.compact,
                             overwrite=cfg.overwrite, input_hash=None if cfg.hash == "none" else cfg.hash)
    return (
        f"merged {len(adapter.modules)} LoRA modules of {len(cfg.finetuned)} adapters with {method.name} into"
        f" {_shown(cfg.output)} (a peft adapter, rank <= {max(m.rank for m in adapter.modules.values())})"
    )


def _check_adapter_args(cfg: Namespace) -> None:
    if cfg.exclude:
        raise ValueError(
            f"Expected no --exclude with peft adapter folders, but got {cfg.exclude}: adapters hold only LoRA"
            " factors (task-specific modules_to_save are refused when an adapter is read)."
        )
    if cfg.merge_into_base and cfg.base is None:
        raise ValueError("--merge-into-base needs --base: the base model's weights (a file or a Hugging Face folder).")
    if cfg.base is not None and not cfg.merge_into_base:
        logging.getLogger(__name__).warning("--base is not used when merging adapters without --merge-into-base")


def _one_line(err: BaseException) -> str:
    shown = err.render("command") if isinstance(err, HintedError) else str(err)  # hints name the flags
    text = " ".join(shown.split()) or type(err).__name__
    return text.strip("'\"") if isinstance(err, KeyError) else text


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-merge`` console script; returns the exit code."""
    try:
        cfg = parse_args(argv)
    except SystemExit as exit_:  # --help or --print-config
        return exit_.code if isinstance(exit_.code, int) else 0
    except UsageError as err:
        return _error(str(err))
    logging.basicConfig(level=logging.WARNING if cfg.quiet else logging.INFO, format=f"{PROG}: %(message)s")
    try:
        summary = _compress(cfg) if cfg.get("command") == "compress" else run(cfg)
    except (ValueError, TypeError, KeyError, OSError) as err:
        return _error(_one_line(err))
    except RankFailedError as err:  # this rank stopped because another one failed: exit 1, its message repeated
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no output was written", file=sys.stderr)
        return 130
    if not cfg.quiet and summary:
        print(summary)
    return 0


def _compress(cfg: Namespace) -> str:
    _check_one_process(launch_from_env(), "compress")
    return run_compress(cfg)


