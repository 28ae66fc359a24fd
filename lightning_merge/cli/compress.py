"""``lightning-merge compress``: each full fine-tune compressed with TSV-C into a small low-rank update of the base.

Usage::

    lightning-merge compress --base B --finetuned A.ckpt B.ckpt [--names a b] --rank 0.1 --format both --output OUT
    lightning-merge compress --config compress.yaml --energy 0.99      # flags after --config win
    lightning-merge compress --config compress.yaml --print-config     # the effective configuration, as YAML

Built like ``merge`` (jsonargparse over :func:`~lightning_merge.compress.compress_checkpoints`'s signature): YAML
keys are the flags' names, relative paths in a YAML file are resolved from its folder, ``null`` means "not set", and
bad input is one line ``lightning-merge: error: <reason>`` naming the key, with exit code 2.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from lightning_merge.cli.parser import _YAML_MODE, PATH, PATTERN, PROG, UsageError, _add, _Switch
from lightning_merge.compress import compress_checkpoints
from lightning_merge.compress.layout import FORMATS
from lightning_merge.functional._checks import Rank
from lightning_merge.functional.svd import SOLVERS
from lightning_merge.io.hashing import HASHES

__all__ = ["build_compress_parser", "run_compress"]


def _default(name: str) -> Any:
    return inspect.signature(compress_checkpoints).parameters[name].default


def _add_inputs(parser: ArgumentParser) -> None:
    _add(parser, "--base", "a path", type=PATH, default=None,
         help="the pre-trained checkpoint: .safetensors, .ckpt, .bin/.pt, or a Hugging Face folder (required)")
    _add(parser, "--finetuned", "a list of paths", type=PATH, nargs="+", metavar="CKPT", default=None,
         help="the full fine-tunes, in the same formats (required)")
    _add(parser, "--names", "a list of task names or null", type=str, nargs="+", metavar="NAME", default=None,
         help="one task name per --finetuned path: the output's folder names (default: the files' stems)")
    _add(parser, "--output", "a path", type=PATH, default=None,
         help="output folder: <task>/ per task + merge_record.json (required)")
    _add(parser, "--exclude", "a list of patterns", type=PATTERN, nargs="+", metavar="PATTERN", default=[],
         help="keys not compressed and not stored (e.g. task heads): globs such as 'head.*', or 're:<regex>'")
    _add(parser, "--prefix", "a string or null", type=str | None, default=None,
         help="key prefix stripped from every checkpoint, e.g. 'model.' for LightningModule .ckpt files")
    _add(parser, "--base-prefix", "a string or null", type=str | None, default=None,
         help="key prefix stripped from the base only (default: --prefix)")
    _add(parser, "--device", "a string", type=str, default="cpu", help="device the SVDs run on, e.g. cpu or cuda:0")


def _add_options(parser: ArgumentParser) -> None:
    _add(parser, "--rank", "an int, a float or null", type=typing.Optional[Rank], default=None,  # noqa: UP045
         help="singular components kept per matrix and task: an int, a fraction of min(m, n) such as 0.1, or null"
         " for min(m, n) // T")
    _add(parser, "--energy", "a float or null", type=float | None, default=None,
         help="instead of --rank: the smallest k per matrix keeping this fraction of ||D||_F^2, e.g. 0.99")
    _add(parser, "--solver", f"one of {list(SOLVERS)}", type=Literal[SOLVERS], default=_default("solver"),
         help="SVD solver: auto (randomized where faster and provably converged), exact or randomized")
    _add(parser, "--format", f"one of {list(FORMATS)}", type=Literal[FORMATS], default=_default("format"),
         help="peft (a LoRA adapter per task, the rest in tsv_c.safetensors), safetensors (the compact form) or both")
    _add(parser, "--strict", "true or false", action=_Switch, default=_default("strict"),
         help="fail on missing keys or shape mismatches; --no-strict compresses the common keys")
    _add(parser, "--overwrite", "true or false", action=_Switch, default=False, help="replace an existing output")
    _add(parser, "--hash", f"one of {[*HASHES, 'none']}", choices=[*HASHES, "none"], default=_default("input_hash"),
         help="hash of every input recorded in merge_record.json")
    _add(parser, "--quiet", "true or false", action=_Switch, default=False, help="no progress bar and no summary")


def build_compress_parser() -> ArgumentParser:
    """The parser of ``lightning-merge compress``; every option is in ``--help``."""
    parser = ArgumentParser(
        prog=f"{PROG} compress", exit_on_error=False, allow_abbrev=False, print_config="--print-config",
        parser_mode=_YAML_MODE, env_prefix=False,
        description="Compress each full fine-tune with TSV-C (Gargiulo et al., CVPR 2025): per matrix parameter the"
        " top-k singular components of its task matrix, written as a peft LoRA adapter of the base and/or the"
        " compact safetensors form, one folder per task.",
        epilog="Example: lightning-merge compress --base base.safetensors --finetuned a.ckpt b.ckpt --prefix model."
        " --rank 0.1 --format both --output compressed/",
    )
    parser.add_argument("--config", action=ActionConfigFile,
                        help="YAML file whose keys are these arguments; flags after it override it")
    _add_inputs(parser)
    _add_options(parser)
    return parser


def _check_required(cfg: Namespace) -> None:
    needed = [k for k in ("base", "finetuned", "output") if cfg.get(k) is None]
    if needed:
        raise UsageError(f"the following arguments are required: {', '.join('--' + k for k in needed)}")


def run_compress(cfg: Namespace) -> str:
    """Run the compression described by parsed arguments; returns the one-line summary."""
    _check_required(cfg)
    finetuned: Any = list(cfg.finetuned)
    if cfg.names is not None:
        if len(cfg.names) != len(finetuned):
            raise ValueError(f"Expected one --names entry per --finetuned path ({len(finetuned)}), but got"
                             f" {len(cfg.names)}: {cfg.names}.")
        finetuned = dict(zip(cfg.names, finetuned, strict=True))
    record = compress_checkpoints(
        cfg.base, finetuned, cfg.output, rank=cfg.rank, energy=cfg.energy, solver=cfg.solver,
        exclude=cfg.exclude, strict=cfg.strict, prefix=cfg.prefix, base_prefix=cfg.base_prefix, format=cfg.format,
        overwrite=cfg.overwrite, input_hash=None if cfg.hash == "none" else cfg.hash, progress=not cfg.quiet,
        device=cfg.device,
    )
    c = record.compression
    return (f"compressed {len(record.merged_keys)} keys of {len(record.tasks)} checkpoints with tsv_c into"
            f" {cfg.output} ({', '.join(record.tasks)}): {c['bytes'] / 1e6:.2f} MB of {c['full_bytes'] / 1e6:.2f}"
            f" MB, ratio {c['ratio']:.3f}, in {record.seconds:.1f} s")
