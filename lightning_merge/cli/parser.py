"""The ``lightning-merge`` parser: jsonargparse over the public signatures and the method classes' typed fields.

Owns the value types (sizes, paths resolved from the YAML file's folder, switches), the method options derived from
the method dataclasses (a ``--method`` switch drops the options the new method does not take), and the one-line
error messages that name the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser, Namespace, set_loader

from lightning_merge.cli.mergekit import MergekitError, from_mergekit, is_mergekit
from lightning_merge.engine import DTYPES, merge_checkpoints
from lightning_merge.io.hashing import HASHES
from lightning_merge.lora import CONFIG_NAME, merge_adapters
from lightning_merge.methods import METHODS, get_method

PROG = "lightning-merge"
COMMANDS = ("merge", "compress")
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_YAML_MODE = "lightning_merge_yaml"
_EXPECTED: dict[str, str] = {}  # key -> what its value must be, for one-line error messages


class UsageError(ValueError):
    """A command line or config that does not parse: reported as one line, exit code 2."""


# ------------------------------------------------------------------------------------ value types


def parse_size(text: str | int) -> int:
    """Bytes from ``"5GB"``, ``"500MiB"`` or ``"1048576"``.

    Example:
        >>> parse_size("2GiB"), parse_size("1.5 MB"), parse_size("100")
        (2147483648, 1500000, 100)
    """
    match = re.fullmatch(r"\s*(\d{1,18}(?:\.\d{0,9})?|\.\d{1,9})\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _SIZE_UNITS or isinstance(text, bool):
        raise ValueError(f"expected a size such as 5GB, 500MiB or 1048576, but got {text!r}")
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])  # at most 18 digits times 2**30: finite
    if size <= 0:
        raise ValueError(f"expected a positive size, but got {text!r}")
    return size


class _Type:
    """A value type of the parser, named in ``--help`` and in messages."""

    def __init__(self, name: str, parse: Callable[[Any], Any]) -> None:
        self.name, self.parse = name, parse

    def __call__(self, value: Any) -> Any:
        return self.parse(value)

    def __repr__(self) -> str:
        return self.name


def _absolute(text: Any) -> str:
    # jsonargparse parses a --config file's values from inside the file's folder (it changes into it): a relative
    # path in a YAML file is resolved from the YAML file's folder, one on the command line from the working directory
    if not isinstance(text, str | os.PathLike) or not os.fspath(text):
        raise ValueError(f"expected a path, but got {text!r}")
    return os.path.abspath(os.path.expanduser(os.fspath(text)))


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, but got {value!r}")
    return value


#: the longest ``--exclude`` pattern: a key pattern, not a program (the glob or regex runs on every key)
MAX_PATTERN_CHARS = 1024


def _pattern(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_PATTERN_CHARS:
        shown = f"{len(value)} characters" if isinstance(value, str) and value else repr(value)
        raise ValueError(f"expected a pattern of 1 to {MAX_PATTERN_CHARS} characters, but got {shown}")
    return value


PATH, SIZE, BOOL = _Type("path", _absolute), _Type("size", parse_size), _Type("bool", _boolean)
PATTERN = _Type("pattern", _pattern)


class _Switch(argparse.Action):
    """``--name`` sets True, ``--no-name`` False; in a config file, ``name: true`` or ``name: false``."""

    def __init__(self, option_strings: list[str], dest: str, default: bool = False, help: str | None = None,
                 **kwargs: Any) -> None:
        flags = [*option_strings, *(["--no-" + option_strings[0][2:]] if len(option_strings) == 1 else [])]
        super().__init__(flags, dest, nargs=0, default=default, type=BOOL, help=help)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, not str(option_string).startswith("--no-"))


class ConfigError(yaml.YAMLError):
    """A ``--config`` text refused before jsonargparse sees it (jsonargparse reports it as a config problem)."""


#: bounds on an untrusted ``--config``: its size, its nodes once aliases are expanded, how deep it nests, and the
#: length of one value (a path of PATH_MAX; below Python's 4300-digit limit on converting ints)
MAX_CONFIG_BYTES, MAX_CONFIG_NODES, MAX_CONFIG_DEPTH, MAX_VALUE_CHARS = 2**20, 10_000, 16, 4096


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _check_duplicates(node: yaml.Node, top: bool) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    keys = [k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge"]
    keys = [k.replace("-", "_") for k in keys] if top else keys  # top-level names: `-` is read as `_`
    duplicate = next((k for k in keys if keys.count(k) > 1), None)
    if duplicate is not None:
        raise ConfigError(f"expected each key once, but {duplicate!r} is given twice")


def _check_nodes(node: yaml.Node, seen: dict[int, tuple[int, int]], path: tuple[int, ...] = ()) -> tuple[int, int]:
    """``(nodes, height)`` of the tree under ``node`` with aliases expanded, refusing duplicate keys, recursive
    aliases, deep nesting and too many nodes. Each node is visited once (``seen``), so a billion laughs costs its
    size on disk, not its expansion."""
    if id(node) in path:
        raise ConfigError("expected a config without recursive aliases (an alias inside its own anchor)")
    if isinstance(node, yaml.ScalarNode) and len(node.value) > MAX_VALUE_CHARS:
        raise ConfigError(f"expected values of at most {MAX_VALUE_CHARS} characters, but the one at line"
                          f" {node.start_mark.line + 1} has {len(node.value)}")
    if id(node) not in seen:
        _check_duplicates(node, top=not path)
        below = [_check_nodes(child, seen, (*path, id(node))) for child in _children(node)]
        seen[id(node)] = (1 + sum(n for n, _ in below), 1 + max((h for _, h in below), default=0))
    nodes, height = seen[id(node)]
    if len(path) + height > MAX_CONFIG_DEPTH:
        raise ConfigError(f"expected a config nested at most {MAX_CONFIG_DEPTH} levels deep")
    if nodes > MAX_CONFIG_NODES:
        raise ConfigError(f"expected a config of at most {MAX_CONFIG_NODES} values once aliases are expanded")
    return nodes, height


def _check_values(data: dict[str, Any]) -> None:
    """Refuse, naming the key, a mapping or a nested list where the command takes a value or a list of values."""
    for key, value in data.items():
        items = value if isinstance(value, list) else [value]
        if any(isinstance(item, dict | list) for item in items):
            shown = "a mapping" if isinstance(value, dict) else "a nested list"
            raise ConfigError(f"expected {key!r} to be {_EXPECTED.get(key, 'a value')}, but got {shown}")


def _load_yaml(text: str) -> Any:
    """jsonargparse's loader for config files and values: safe YAML, bounded (:data:`MAX_CONFIG_BYTES`,
    :data:`MAX_CONFIG_NODES`, :data:`MAX_CONFIG_DEPTH`), duplicate keys refused, ``-`` in top-level names read as
    ``_``; a mapping with ``merge_method`` is a mergekit config, translated
    (:func:`~lightning_merge.cli.mergekit.from_mergekit`)."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"expected a config of at most {MAX_CONFIG_BYTES} bytes, but got {len(text)}")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_nodes(node, {})
        data = None if node is None else loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"expected a config nested at most {MAX_CONFIG_DEPTH} levels deep") from None
    except ValueError as err:  # a value the YAML constructor cannot convert, e.g. a date out of range
        raise ConfigError(" ".join(str(err).split())) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        return data
    if is_mergekit(data):
        try:
            return from_mergekit(data)
        except MergekitError as err:
            raise ConfigError(str(err)) from None
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    _check_values(data)
    return data


set_loader(_YAML_MODE, _load_yaml, exceptions=(yaml.YAMLError,))


# ------------------------------------------------------------------------ method options from fields


def _method_fields() -> dict[str, list[tuple[str, Any, Any]]]:
    """``{option: [(method name, type hint, default), ...]}`` over every registered method's dataclass fields."""
    options: dict[str, list[tuple[str, Any, Any]]] = {}
    for name, cls in METHODS.items():
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            options.setdefault(field.name, []).append((name, hints[field.name], field.default))
    return options


def _describe(hint: Any) -> str:
    """What a value of type ``hint`` looks like, in words (for error messages)."""
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is Literal:
        return f"one of {list(typing.get_args(hint))}"
    if typing.get_origin(hint) is tuple:
        return "a list of numbers"
    args = typing.get_args(hint)
    if args:
        words = [_describe(a) for a in args]
        return ", ".join(words[:-1]) + " or " + words[-1]
    return {bool: "true or false", int: "an int", float: "a float", str: "a string"}.get(hint, str(hint))


_OPTION_DOCS = {
    "scaling": "the coefficient lam of W = W0 + lam * M",
    "weights": "one weight per fine-tuned checkpoint, multiplying its task vector",
    "density": "fraction of each task vector kept by magnitude (TIES trim)",
    "rank": "singular components kept per task: an int, a fraction of min(m, n) such as 0.125, or null for"
    " min(m, n) // T",
    "solver": "SVD solver",
    "basis": "SFTM bases: features (the paper) or orthogonal (TSV-M's orthogonalized bases)",
    "embeddings": "TSV-M/SFTM on vocabulary-sized matrices (token embeddings, output heads): matrix (by their"
    " singular features) or average (as other parameters)",
    "fit": "SFTM coefficients: response (each feature's own response, the paper) or mapping (each feature's whole"
    " mapping, least squares)",
    "rcond": "relative cut-off of the minimum-norm least-squares solve, or null for the default",
}


def _yaml(value: Any) -> str:
    return "null" if value is None else repr(value)


def _option_help(option: str, entries: list[tuple[str, Any, Any]]) -> str:
    if len(entries) == len(METHODS) and len({repr(d) for _, _, d in entries}) == 1:
        where = f"every method; default {_yaml(entries[0][2])}"
    else:
        where = "; ".join(f"{name}: default {_yaml(default)}" for name, _, default in entries)
    return f"{_OPTION_DOCS.get(option, option)} [{where}; null: the method's default]".replace("%", "%%")


class _MethodAction(argparse.Action):
    """``--method NAME`` on the command line; it unsets the method options set before it that NAME does not take."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        taken = {f.name for f in dataclasses.fields(METHODS[values])}
        for option in _method_fields():
            if option not in taken and getattr(namespace, option, None) is not None:
                setattr(namespace, option, None)
        setattr(namespace, self.dest, values)


def _add_method_options(parser: ArgumentParser) -> None:
    group = parser.add_argument_group("method options (from the method classes' fields; see lightning_merge.methods)")
    for option, entries in _method_fields().items():
        hint, flag, help_ = entries[0][1], f"--{option.replace('_', '-')}", _option_help(option, entries)
        if typing.get_origin(hint) is tuple or any(typing.get_origin(a) is tuple for a in typing.get_args(hint)):
            _add(group, flag, "a list of numbers", type=float, nargs="+", metavar="W", default=None, help=help_)
        else:
            _add(group, flag, _describe(hint | None), type=hint | None, default=None, help=help_)


def method_from(cfg: Namespace) -> Any:
    options = {name: cfg[name] for name in _method_fields() if cfg.get(name) is not None}
    if "weights" in options:
        options["weights"] = tuple(options["weights"])
    return get_method(cfg.method, **options)


# ---------------------------------------------------------------------------------------- the parser


def _add(container: Any, flag: str, expected: str, **options: Any) -> None:
    _EXPECTED[flag[2:].replace("-", "_")] = expected
    container.add_argument(flag, **options)


def _default(name: str, function: Callable[..., Any] = merge_checkpoints) -> Any:
    """The default of a parameter of a public function: the command's defaults are the Python API's."""
    return inspect.signature(function).parameters[name].default


def _add_io_arguments(parser: ArgumentParser) -> None:
    _add(parser, "--base", "a path", type=PATH, default=None,
         help="the pre-trained checkpoint: .safetensors, .ckpt, .bin/.pt, or a Hugging Face folder (required, except"
         " for adapters without --merge-into-base)")
    _add(parser, "--finetuned", "a list of paths", type=PATH, nargs="+", metavar="CKPT", default=None,
         help="the fine-tuned checkpoints (same formats), or peft LoRA adapter folders (all of them: adapters and"
         " checkpoints do not mix) (required)")
    _add(parser, "--method", f"one of {sorted(METHODS)}", action=_MethodAction, choices=sorted(METHODS),
         default=None, help="the merge method (required); unsets the earlier options it does not take")
    _add(parser, "--output", "a path", type=PATH, default=None,
         help="output folder: model.safetensors (sharded above --max-shard-size) + merge_record.json (required)")
    _add(parser, "--exclude", "a list of patterns", type=PATTERN, nargs="+", metavar="PATTERN",
         default=list(_default("exclude")),
         help="task-specific keys never merged (copied from the base): globs such as 'head.*', or 're:<regex>'")
    _add(parser, "--prefix", "a string or null", type=str | None, default=_default("prefix"),
         help="key prefix stripped from every checkpoint, e.g. 'model.' for LightningModule .ckpt files")
    _add(parser, "--base-prefix", "a string or null", type=str | None, default=_default("base_prefix"),
         help="key prefix stripped from the base only (default: --prefix)")
    _add(parser, "--device", "a string", type=str, default="cpu",
         help="device the merge runs on, e.g. cpu or cuda:0 (adapters are merged on cpu)")
    _add(parser, "--dtype", f"one of {sorted(DTYPES)} or null", type=Literal[tuple(sorted(DTYPES))] | None,
         default=_default("dtype"), help="dtype of the merged weights (default: the base's)")
    _add(parser, "--max-shard-size", "a size such as 5GB, 500MiB or 1048576", type=SIZE, metavar="SIZE",
         default=_default("max_shard_size"), help="shard size limit in bytes, or e.g. 5GiB, 500MB")


def _add_switches(parser: ArgumentParser) -> None:
    _add(parser, "--strict", "true or false", action=_Switch, default=_default("strict"),
         help="fail on missing keys or shape mismatches; --no-strict merges the common keys and reports the rest")
    _add(parser, "--overwrite", "true or false", action=_Switch, default=_default("overwrite"),
         help="replace an existing output folder")
    _add(parser, "--hash", f"one of {[*HASHES, 'none']}", choices=[*HASHES, "none"],
         default=_default("input_hash"),
         help="hash of every input recorded in merge_record.json: xxh3_128 (at memory speed), sha256 (matches the"
         " Hugging Face Hub's file ids; about 10x the time of reading the inputs) or none")
    _add(parser, "--quiet", "true or false", action=_Switch, default=False, help="no progress bar and no summary")
    _add(parser, "--merge-into-base", "true or false", action=_Switch, default=False,
         help="adapters only: write the --base weights plus the merged update (model.safetensors,"
         " merge_record.json, the base's config.json) instead of a merged adapter")
    _add(parser, "--compact", "true or false", action=_Switch, default=_default("compact", merge_adapters),
         help="adapters only: store each merged module as the SVD of its update, of minimal rank")


def build_parser() -> ArgumentParser:
    """The parser of ``lightning-merge merge`` (also the command without a name); every option is in ``--help``."""
    parser = ArgumentParser(
        prog=f"{PROG} [merge]", exit_on_error=False, allow_abbrev=False, print_config="--print-config",
        parser_mode=_YAML_MODE, env_prefix=False,
        description="Merge fine-tuned checkpoints into one model, parameter by parameter, or peft LoRA adapters"
        " into one adapter (when every --finetuned path is an adapter folder, with adapter_config.json). Commands:"
        " merge (the default: the command name may be left out).",
        epilog="Example: lightning-merge merge --base base.safetensors --finetuned a.ckpt b.ckpt --prefix model."
        " --method tsv_m --rank 0.125 --exclude 'head.*' --output merged/. Adapters: lightning-merge merge"
        " --finetuned adapter_a/ adapter_b/ --method tsv_m --output merged_adapter/ (add --merge-into-base --base"
        " base_model/ for full weights). In a --config YAML file, relative paths are resolved from its folder.",
    )
    parser.add_argument("--config", action=ActionConfigFile,
                        help="YAML file whose keys are these arguments (base, finetuned, method, rank, exclude, ...);"
                        " flags after it override it")
    _add_io_arguments(parser)
    _add_switches(parser)
    _add_method_options(parser)
    return parser


# -------------------------------------------------------------------------------------- parsing


def _usage_message(text: str) -> str:
    """One line naming the key, from a jsonargparse or argparse error message."""
    unknown = re.search(r"Option '([^']+)' is not accepted", text)
    if unknown:
        return f"unknown key {unknown.group(1)!r} in --config; expected some of {sorted(_EXPECTED)}"
    if text.startswith("Unexpected config"):
        return "expected --config to hold a mapping of argument names to values, but got " + " ".join(text.split()[2:])
    if text.startswith("Problems parsing config"):
        return "cannot read --config: " + " ".join(text.split(":", 1)[1].split())
    match = re.match(r'Parser key "(\w+)"[^:]*:(.*)', text, re.S) or re.match(
        r"argument --([\w-]+): invalid \w+ value:(.*)", text, re.S)
    if match is None:
        return " ".join(text.split())
    key = match.group(1).replace("-", "_")
    if key == "config":
        return "cannot read --config: " + " ".join(match.group(2).split())
    if key not in _EXPECTED:
        return " ".join(text.split())
    given = re.search(r"(?:Given value|Got value|but got):?\s*(.+?)\s*$|^\s*('.*') not among choices", match.group(2))
    value = (given.group(1) or given.group(2)) if given else None
    value = match.group(2).strip() if text.startswith("argument --") else value
    shown = "" if value is None else " " + (value if value[:1] in "'\"" else repr(value))
    return f"argument --{key.replace('_', '-')}: invalid value{shown}: expected {key!r} to be {_EXPECTED[key]}"


def _check_config_sizes(argv: Sequence[str]) -> None:
    """Refuse a ``--config`` file over :data:`MAX_CONFIG_BYTES` before jsonargparse reads all of it."""
    for flag, value in zip(argv, [*argv[1:], ""], strict=True):
        path = value if flag == "--config" else flag[len("--config="):] if flag.startswith("--config=") else None
        if path and os.path.isfile(path) and os.path.getsize(path) > MAX_CONFIG_BYTES:
            raise UsageError(f"cannot read --config: expected a file of at most {MAX_CONFIG_BYTES} bytes, but"
                             f" {path!r} has {os.path.getsize(path)}")


def parse_args(argv: Sequence[str] | None = None) -> Namespace:
    """Parse a command line (without the program name): an optional command name (``merge``, the default, or
    ``compress``, whose namespace has ``command="compress"``), then its options.

    Raises:
        UsageError: the arguments do not parse, with a one-line message naming the key.
        SystemExit: ``--help`` or ``--print-config`` (code 0).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else "merge"  # no command name: `merge`
    argv = argv[1:] if argv and argv[0] in COMMANDS else argv
    _check_config_sizes(argv)
    try:
        if command == "compress":
            from lightning_merge.cli.compress import build_compress_parser  # it imports this module

            cfg = build_compress_parser().parse_args(argv)
            cfg.command = "compress"
            return cfg
        return build_parser().parse_args(argv)
    except ArgumentError as err:
        raise UsageError(_usage_message(str(err))) from None


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a peft adapter folder: a folder holding ``adapter_config.json``."""
    return (Path(path) / CONFIG_NAME).is_file()


def check_required(cfg: Namespace) -> None:
    adapters = any(is_adapter_folder(p) for p in cfg.finetuned or ())  # a mix is refused by run, naming the path
    needed = [k for k in ("finetuned", "method", "output") if cfg.get(k) is None]
    needed = ["base"] * (cfg.base is None and not adapters) + needed
    if needed:
        raise UsageError(f"the following arguments are required: {', '.join('--' + k for k in needed)}")


