"""The ``lightning-merge`` command: merge checkpoints on disk with any registered method.

Usage::

    lightning-merge --base B --finetuned F1 F2 F3 --method tsv_m --rank 0.125 --exclude 'head.*' --output OUT
    lightning-merge --config merge.yaml [--overwrite ...]
    lightning-merge --finetuned ADAPTER1 ADAPTER2 --method tsv_m --output MERGED_ADAPTER
    lightning-merge --finetuned ADAPTER1 ADAPTER2 --method tsv_m --merge-into-base --base BASE --output MERGED_MODEL

A YAML config holds the same arguments under the same names (``finetuned: [F1, F2]``, ``max_shard_size: 2GB``,
``strict: false``); they are parsed exactly like the flags, and flags given on the command line override them.
When every ``--finetuned`` path is a peft LoRA adapter folder (it holds ``adapter_config.json``), the adapters are
merged in low-rank form (:func:`~lightning_merge.lora.merge_adapters`) into one peft adapter folder, or with
``--merge-into-base`` into the ``--base`` weights; ``--base`` is then needed only for ``--merge-into-base``.
The method options (``--rank``, ``--density``, ...) are derived from the method classes' fields. Bad input
ends with ``lightning-merge: error: <reason>`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import shutil
import uuid
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml

from lightning_merge.engine import DTYPES, _check_output, _replace, merge_checkpoints
from lightning_merge.io import CheckpointSource, open_source
from lightning_merge.io.writer import TensorSpec, write_stream
from lightning_merge.lora import CONFIG_NAME, LoraAdapter, merge_adapters, merge_into_base
from lightning_merge.methods import METHODS, get_method

__all__ = ["build_parser", "main"]

PROG = "lightning-merge"
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (no usage block), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


# ------------------------------------------------------------------------------------ value parsers


def _none_or(parse: Any) -> Any:
    def parser(text: str) -> Any:
        return None if text.strip().lower() in ("none", "null", "~") else parse(text)

    parser.__name__ = getattr(parse, "__name__", "value")
    return parser


def _number(text: str) -> int | float:
    """An int when written as one (``8``), else a float (``0.125``)."""
    return int(text) if re.fullmatch(r"[+-]?\d+", text.strip()) else float(text)


def parse_size(text: str) -> int:
    """Bytes from ``"5GB"``, ``"500MiB"`` or ``"1048576"``.

    Example:
        >>> parse_size("2GiB"), parse_size("1.5 MB"), parse_size("100")
        (2147483648, 1500000, 100)
    """
    match = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 5GB, 500MiB or 1048576, but got {text!r}")
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size, but got {text!r}")
    return size


# ------------------------------------------------------------------------ method options from fields


def _method_fields() -> dict[str, list[tuple[str, Any, Any]]]:
    """``{option: [(method name, type hint, default), ...]}`` over every registered method's dataclass
    fields."""
    options: dict[str, list[tuple[str, Any, Any]]] = {}
    for name, cls in METHODS.items():
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            options.setdefault(field.name, []).append((name, hints[field.name], field.default))
    return options


def _argument_for(hint: Any) -> dict[str, Any]:
    """argparse keywords (``type``, ``choices``, ``nargs``) for a field's type hint."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    if typing.get_origin(hint) is typing.Literal:
        return {"choices": list(args), "metavar": "{" + ",".join(map(str, args)) + "}"}
    if typing.get_origin(hint) is tuple or any(typing.get_origin(a) is tuple for a in args):
        return {"type": float, "nargs": "+", "metavar": "W"}
    if set(args) == {int, float}:
        return {"type": _none_or(_number) if optional else _number, "metavar": "N"}
    base = args[0] if args else hint
    literal = typing.get_origin(base) is typing.Literal
    if literal:
        choices = typing.get_args(base)
        return {"choices": list(choices), "metavar": "{" + ",".join(choices) + "}"}
    return {"type": _none_or(base) if optional else base, "metavar": base.__name__.upper()}


_OPTION_DOCS = {
    "scaling": "the coefficient lam of W = W0 + lam * M",
    "weights": "one weight per fine-tuned checkpoint, multiplying its task vector",
    "density": "fraction of each task vector kept by magnitude (TIES trim)",
    "rank": "singular components kept per task: an int, a fraction of min(m, n) such as 0.125, or none for"
    " min(m, n) // T",
    "solver": "SVD solver",
    "basis": "SFTM bases: features (the paper) or orthogonal (TSV-M's orthogonalized bases)",
    "rcond": "relative cut-off of the minimum-norm least-squares solve, or none for the default",
}


def _option_help(option: str, entries: list[tuple[str, Any, Any]]) -> str:
    if len(entries) == len(METHODS) and len({repr(d) for _, _, d in entries}) == 1:
        where = f"every method; default {entries[0][2]!r}"
    else:
        where = "; ".join(f"{name}: default {default!r}" for name, _, default in entries)
    return f"{_OPTION_DOCS.get(option, option)} [{where}]".replace("%", "%%")


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("method options (from the method classes; see lightning_merge.methods)")
    for option, entries in _method_fields().items():
        group.add_argument(f"--{option.replace('_', '-')}", dest=option, default=argparse.SUPPRESS,
                           help=_option_help(option, entries), **_argument_for(entries[0][1]))


# ---------------------------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    """The ``lightning-merge`` argument parser (every option documented in ``--help``)."""
    parser = _Parser(
        prog=PROG,
        description="Merge fine-tuned checkpoints into one model, parameter by parameter, or peft LoRA adapters"
        " into one adapter (when every --finetuned path is an adapter folder, with adapter_config.json).",
        epilog="Example: lightning-merge --base base.safetensors --finetuned a.ckpt b.ckpt --prefix model."
        " --method tsv_m --rank 0.125 --exclude 'head.*' --output merged/. Adapters: lightning-merge --finetuned"
        " adapter_a/ adapter_b/ --method tsv_m --output merged_adapter/ (add --merge-into-base --base base_model/"
        " for full weights).",
    )
    parser.add_argument(
        "--config", type=Path, metavar="YAML",
        help="YAML file whose keys mirror these arguments (base, finetuned, method, rank, exclude, ...);"
        " command-line flags override it",
    )
    for flag, options in _IO_ARGUMENTS:
        parser.add_argument(flag, **options)
    _add_method_options(parser)
    return parser


_FLAG = argparse.BooleanOptionalAction


def _arg(flag: str, **options: Any) -> tuple[str, dict[str, Any]]:
    return flag, options


_IO_ARGUMENTS: list[tuple[str, dict[str, Any]]] = [
    _arg("--base", required=True,
         help="the pre-trained checkpoint: .safetensors, .ckpt, .bin/.pt, or a Hugging Face folder"),
    _arg("--finetuned", required=True, nargs="+", metavar="CKPT",
         help="the fine-tuned checkpoints (same formats), or peft LoRA adapter folders (all of them: adapters and"
         " checkpoints do not mix); --base is then optional"),
    _arg("--method", required=True, choices=sorted(METHODS), help="the merge method"),
    _arg("--output", required=True,
         help="output folder: model.safetensors (sharded above --max-shard-size) + merge_record.json"),
    _arg("--exclude", nargs="+", default=[], metavar="PATTERN",
         help="task-specific keys never merged (copied from the base): globs such as 'head.*', or"
         " 're:<regex>'"),
    _arg("--prefix", default=None,
         help="key prefix stripped from every checkpoint, e.g. 'model.' for LightningModule .ckpt files"),
    _arg("--base-prefix", default=None, help="key prefix stripped from the base only (default: --prefix)"),
    _arg("--device", default="cpu",
         help="device the merge runs on, e.g. cpu or cuda:0 (default: cpu; adapters are merged on cpu)"),
    _arg("--dtype", default=None, choices=sorted(DTYPES),
         help="dtype of the merged weights (default: the base's)"),
    _arg("--max-shard-size", type=parse_size, default="5GiB", metavar="SIZE",
         help="shard size limit, e.g. 5GiB, 500MB (default: 5GiB)"),
    _arg("--strict", action=_FLAG, default=True,
         help="fail on missing keys or shape mismatches (default); --no-strict merges the common keys and"
         " reports the rest"),
    _arg("--overwrite", action=_FLAG, default=False, help="replace an existing output folder"),
    _arg("--hash", default="xxh3_128", choices=["xxh3_128", "sha256", "none"],
         help="hash of every input recorded in merge_record.json: xxh3_128 (default; at memory speed), sha256"
         " (matches the Hugging Face Hub's file ids; about 10x the time of reading the inputs) or none"),
    _arg("--quiet", action=_FLAG, default=False, help="no progress bar and no summary"),
    _arg("--merge-into-base", action=_FLAG, default=False,
         help="adapters only: write the --base weights plus the merged update (model.safetensors,"
         " merge_record.json, the base's config.json) instead of a merged adapter"),
    _arg("--compact", action=_FLAG, default=False,
         help="adapters only: store each merged module as the SVD of its update, of minimal rank"),
]


# -------------------------------------------------------------------------------------------- config


def _config_argv(path: Path, parser: argparse.ArgumentParser) -> list[str]:
    """The YAML config as command-line tokens, so that its values go through the same parsing and checks."""
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        parser.error(f"cannot read --config {str(path)!r}: {str(err).splitlines()[0]}")
    if not isinstance(config, dict):
        parser.error(
            f"expected --config {str(path)!r} to hold a mapping of argument names to values, but got"
            f" {type(config).__name__}"
        )
    # the parser is ours: its actions are the single list of argument names and types
    known = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    argv: list[str] = []
    for key, value in config.items():
        dest = str(key).replace("-", "_")
        if dest not in known:
            parser.error(f"unknown key {key!r} in --config {str(path)!r}; expected some of {sorted(known)}")
        argv += _tokens(known[dest], value)
    return argv


def _tokens(action: argparse.Action, value: Any) -> list[str]:
    flag = action.option_strings[0]
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise argparse.ArgumentTypeError(
                f"expected {action.dest!r} to be true or false in the config, but got {value!r}"
            )
        return [flag if value else "--no-" + flag[2:]]
    values = value if isinstance(value, list) else [value]
    if action.nargs != "+" and isinstance(value, list):
        raise argparse.ArgumentTypeError(
            f"expected one value for {action.dest!r} in the config, but got a list"
        )
    return [flag, *("none" if v is None else str(v) for v in values)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line, after the ``--config`` YAML when one is given (flags win)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = _Parser(prog=PROG, add_help=False)
    pre.add_argument("--config", type=Path)
    known, _ = pre.parse_known_args(argv)
    if known.config is not None:
        try:
            argv = _config_argv(known.config, parser) + argv
        except argparse.ArgumentTypeError as err:
            parser.error(str(err))
    _base_optional_for_adapters(parser, argv)
    return parser.parse_args(argv)


def is_adapter_folder(path: str | Path) -> bool:
    """Whether ``path`` is a peft adapter folder: a folder holding ``adapter_config.json``."""
    return (Path(path) / CONFIG_NAME).is_file()


def _base_optional_for_adapters(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    # --base is required for checkpoints; with adapters only --merge-into-base needs it (checked in run_adapters)
    pre = _Parser(prog=PROG, add_help=False)
    pre.add_argument("--finetuned", nargs="+", default=[])
    finetuned = pre.parse_known_args(argv)[0].finetuned
    if any(is_adapter_folder(path) for path in finetuned):
        next(a for a in parser._actions if a.dest == "base").required = False


# ------------------------------------------------------------------------------------------------ main


def _method_from(args: argparse.Namespace) -> Any:
    options = {name: getattr(args, name) for name in _method_fields() if hasattr(args, name)}
    if "weights" in options and options["weights"] is not None:
        options["weights"] = tuple(options["weights"])
    return get_method(args.method, **options)


def run(args: argparse.Namespace) -> str:
    """Run the merge described by parsed arguments; returns the one-line summary."""
    if _adapter_inputs(args.finetuned):
        return run_adapters(args)
    for flag in ("merge_into_base", "compact"):
        if getattr(args, flag):
            raise ValueError(f"--{flag.replace('_', '-')} applies to peft adapter folders only, but --finetuned"
                             " holds checkpoints.")
    record = merge_checkpoints(
        _method_from(args), args.base, args.finetuned, args.output, exclude=args.exclude, strict=args.strict,
        device=args.device, dtype=args.dtype, overwrite=args.overwrite, progress=not args.quiet,
        max_shard_size=args.max_shard_size, prefix=args.prefix, base_prefix=args.base_prefix,
        input_hash=None if args.hash == "none" else args.hash,
    )
    return (
        f"merged {len(record.merged_keys)} keys of {len(args.finetuned)} checkpoints with {record.method}"
        f" into"
        f" {args.output} ({len(record.excluded_keys)} excluded, {len(record.skipped)} skipped) in"
        f" {record.seconds:.1f} s"
    )


def _adapter_inputs(paths: Sequence[str]) -> bool:
    """Whether the inputs are adapter folders (all) or checkpoints (none); a mix is refused, naming the odd path."""
    kinds = [is_adapter_folder(path) for path in paths]
    if all(kinds) or not any(kinds):
        return kinds[0]
    odd = next(p for p, kind in zip(paths, kinds) if kind != kinds[0])
    first = "a peft adapter folder" if kinds[0] else "a checkpoint"
    raise ValueError(
        f"Expected every --finetuned path to be {first} like {paths[0]!r}, but {odd!r} is"
        f" {'not' if kinds[0] else 'a peft adapter folder'}. HINT: merge adapters and full checkpoints separately,"
        " or merge the adapters into the base first."
    )


# ---------------------------------------------------------------------------------------- LoRA adapters


def run_adapters(args: argparse.Namespace) -> str:
    """Merge peft adapter folders into ``--output``: one adapter, or the base weights plus the merged update."""
    _check_adapter_args(args)
    base = _open_base(args) if args.merge_into_base else None
    output = _check_output(args.output, args.overwrite, [base] if base is not None else [])
    _check_not_an_adapter(output, args.finetuned)
    dtype = DTYPES[args.dtype] if args.dtype is not None and base is None else None
    adapter = merge_adapters(_method_from(args), args.finetuned, dtype=dtype, compact=args.compact)
    write = _base_writer(args, base, adapter) if base is not None else adapter.save
    _write_atomically(output, write)
    what = "the base weights plus the merged update" if args.merge_into_base else "a peft adapter"
    return (
        f"merged {len(adapter.modules)} LoRA modules of {len(args.finetuned)} adapters with {args.method} into"
        f" {args.output} ({what}, rank <= {max(m.rank for m in adapter.modules.values())})"
    )


def _check_adapter_args(args: argparse.Namespace) -> None:
    if args.exclude:
        raise ValueError(
            f"Expected no --exclude with peft adapter folders, but got {args.exclude}: adapters hold only LoRA"
            " factors (task-specific modules_to_save are refused when an adapter is read)."
        )
    if args.merge_into_base and args.base is None:
        raise ValueError("--merge-into-base needs --base: the base model's weights (a file or a Hugging Face folder).")
    if args.base is not None and not args.merge_into_base:
        logging.getLogger(__name__).warning("--base is not used when merging adapters without --merge-into-base")


def _check_not_an_adapter(output: Path, adapters: Sequence[str]) -> None:
    for folder in adapters:
        folder_path = Path(folder).resolve()
        if output.resolve() in (folder_path, *folder_path.parents) or folder_path in output.resolve().parents:
            raise ValueError(f"Expected --output to be outside the input adapter {folder!r}, but got {str(output)!r}.")


def _write_atomically(output: Path, write: Any) -> None:
    """``write(tmp)`` into a temporary sibling of ``output``, then rename it to ``output``."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        write(tmp)
        _replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _open_base(args: argparse.Namespace) -> CheckpointSource:
    prefix = args.base_prefix if args.base_prefix is not None else args.prefix
    return open_source(args.base, prefix=prefix, label="base")


def _base_writer(args: argparse.Namespace, base: CheckpointSource, adapter: LoraAdapter) -> Any:
    """A writer of the base with the adapter's update added to the adapted weights (streamed key by key)."""
    names = [f"{name}.weight" for name in adapter.modules]
    updated = merge_into_base(adapter, {k: base.get_tensor(k) for k in names if k in base.keys()})
    dtype = DTYPES[args.dtype] if args.dtype is not None else None

    def out_dtype(key: str) -> torch.dtype:
        return dtype if dtype is not None and base.dtype(key).is_floating_point else base.dtype(key)

    def write(folder: Path) -> None:
        specs = [TensorSpec(k, base.shape(k), out_dtype(k)) for k in base.keys()]
        stream = ((k, (updated[k] if k in updated else base.get_tensor(k)).to(out_dtype(k))) for k in base.keys())
        files = write_stream(folder, specs, stream, max_shard_size=args.max_shard_size)
        _copy_model_config(Path(args.base), folder)
        (folder / "merge_record.json").write_text(json.dumps(_adapter_record(args, updated, files), indent=2) + "\n")

    return write


def _copy_model_config(base: Path, folder: Path) -> None:
    # so that a Hugging Face base folder gives an output that `from_pretrained` loads
    for name in ("config.json", "generation_config.json"):
        if (base / name).is_file():
            shutil.copyfile(base / name, folder / name)


def _adapter_record(args: argparse.Namespace, updated: dict[str, Any], files: list[str]) -> dict[str, Any]:
    from lightning_merge import __version__

    method = _method_from(args)
    return {
        "method": method.name, "options": method.options(), "scaling": float(method.scaling),
        "base": str(args.base), "adapters": [str(p) for p in args.finetuned], "merged_keys": sorted(updated),
        "outputs": [*files, "merge_record.json"], "version": __version__,
    }


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text.strip("'\"") if isinstance(err, KeyError) else text


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-merge`` console script; returns the exit code."""
    try:
        args = parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a one-line usage error (2)
        return exit_.code if isinstance(exit_.code, int) else 2
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format=f"{PROG}: %(message)s")
    try:
        summary = run(args)
    except (ValueError, TypeError, KeyError, OSError) as err:
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no output was written", file=sys.stderr)
        return 130
    if not args.quiet:
        print(summary)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
