"""mergekit YAML configs for the ``lightning-merge`` command (``--config mergekit.yml``).

A ``--config`` mapping with a ``merge_method`` key is read as a mergekit config and translated into this command's
keys before they are type-checked: ``models`` (each ``model`` with its ``parameters``), ``base_model``,
``merge_method``, ``parameters`` (shared, overridden per model), ``dtype`` and ``out_dtype``. The methods both tools
have (``linear``, ``task_arithmetic``, ``ties``) are mapped so that the merged weights are mergekit's (up to
round-off; README, "From mergekit", lists what cannot match); ``tsv_m`` and ``sftm`` are this project's.
What has no equivalent is refused with an error naming the field (``models[1].parameters.weight``), before any work.

The mapping (mergekit 0.1.5, ``merge_methods/linear.py`` and ``generalized_task_arithmetic.py``), with
``D_t = W_t - W0`` and ``w_t`` the ``weight`` of model ``t``:

* ``linear``: ``sum_t w_t W_t / sum_t w_t`` (``normalize: true``, the default) is ``W0 + sum_t c_t D_t`` with
  ``c_t = w_t / sum w`` for any ``W0``: ``average`` when the ``c_t`` are equal, else ``task_arithmetic`` with
  ``weights = c``, ``scaling = 1``. The anchor ``W0`` is ``base_model`` or the first model.
* ``task_arithmetic``: ``W0 + lambda * sum_t w_t D_t`` (divided by ``sum w`` with ``normalize: true``):
  ``task_arithmetic`` with ``weights = w``, ``scaling = lambda`` (mergekit's default 1, not this project's 0.3).
* ``ties``: one ``density`` for every model (1 when absent: mergekit's default, not this project's 0.2) and one
  ``weight`` for every model (which mergekit's weighted disjoint mean cancels): ``ties`` with ``density``,
  ``scaling = lambda``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

METHODS = ("linear", "task_arithmetic", "ties", "tsv_m", "sftm")
TOP_LEVEL = frozenset({"merge_method", "models", "base_model", "parameters", "dtype", "out_dtype", "name",
                       "tokenizer_source"})
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16",
          "bf16": "bfloat16", "float64": "float64"}
#: the parameters each method takes (``weight`` and ``density`` per model, the others shared); ``int8_mask``
#: changes nothing but mergekit's memory use, so it is accepted and ignored
_PARAMETERS = {
    "linear": {"weight", "normalize"},
    "task_arithmetic": {"weight", "density", "normalize", "lambda", "int8_mask"},
    "ties": {"weight", "density", "normalize", "lambda", "int8_mask"},
    "tsv_m": {"weight", "lambda", "rank", "solver", "embeddings"},
    "sftm": {"weight", "lambda", "rank", "solver", "embeddings", "basis", "rcond", "fit"},
}


class MergekitError(ValueError):
    """A mergekit config this command cannot run: the message names the field."""


def is_mergekit(data: Any) -> bool:
    """Whether a loaded ``--config`` mapping is a mergekit config (it has ``merge_method``)."""
    return isinstance(data, dict) and "merge_method" in data


def _fail(field: str, expected: str, got: Any) -> MergekitError:
    shown = "a mapping" if isinstance(got, dict) else "a list" if isinstance(got, list) else repr(got)
    return MergekitError(f"mergekit field `{field}`: expected {expected}, but got {shown}")


def _number(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        hint = " (per-layer gradients and filtered values are not supported)" if isinstance(value, list | dict) else ""
        raise _fail(field, "a finite number" + hint, value)
    return float(value)


def _flag(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(field, "true or false", value)
    return value


def _mapping(field: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(field, "a mapping", value)
    return value


class _Config:
    """A checked mergekit config: the models, the base and each parameter's value per model."""

    def __init__(self, data: dict[str, Any]) -> None:
        unknown = sorted(map(str, set(data) - TOP_LEVEL))
        if unknown:
            raise MergekitError(f"mergekit field `{unknown[0]}` is not supported; expected some of {sorted(TOP_LEVEL)}"
                                " (slices, modules, tokenizer and chat_template have no equivalent here)")
        self.method = data["merge_method"]
        if self.method not in METHODS:
            raise _fail("merge_method", f"one of {list(METHODS)}", self.method)
        if data.get("tokenizer_source") not in (None, "base"):
            raise _fail("tokenizer_source", "base or null (the base's tokenizer files are copied)",
                        data["tokenizer_source"])
        self.base = data.get("base_model")
        if self.base is not None and not isinstance(self.base, str):
            raise _fail("base_model", "a path", self.base)
        self.shared = self._parameters("parameters", data.get("parameters"))
        self.models, self.parameters = self._models(data.get("models"))

    def _parameters(self, field: str, value: Any) -> dict[str, Any]:
        parameters = _mapping(field, value)
        for name in parameters:
            if name not in _PARAMETERS[self.method]:
                raise _fail(f"{field}.{name}", f"a parameter of {self.method}: one of"
                            f" {sorted(_PARAMETERS[self.method])}", name)
        return parameters

    def _models(self, value: Any) -> tuple[list[str], list[dict[str, Any]]]:
        if not isinstance(value, list) or not value:
            raise _fail("models", "a non-empty list of {model: <path>, parameters: {...}}", value)
        models, parameters = [], []
        for i, entry in enumerate(value):
            entry = {"model": entry} if isinstance(entry, str) else _mapping(f"models[{i}]", entry)
            extra = sorted(map(str, set(entry) - {"model", "parameters"}))
            if extra:
                raise _fail(f"models[{i}].{extra[0]}", "only `model` and `parameters`", extra[0])
            if not isinstance(entry.get("model"), str) or not entry["model"]:
                raise _fail(f"models[{i}].model", "a path", entry.get("model"))
            if entry["model"] == self.base and self.method != "linear":
                continue  # the base among the models: mergekit merges the others onto it
            own = self._parameters(f"models[{i}].parameters", entry.get("parameters"))
            models.append(entry["model"])
            parameters.append({"index": i, **own})
        if not models:
            raise _fail("models", "at least one model besides base_model", value)
        return models, parameters

    def per_model(self, name: str, default: Any, check: Callable[[str, Any], Any]) -> list[Any]:
        """The value of parameter ``name`` for each model: its own, else the shared one, else ``default``."""
        values = []
        for own in self.parameters:
            field = f"models[{own['index']}].parameters.{name}"
            if name in own:
                values.append(check(field, own[name]))
            elif name in self.shared:
                values.append(check(f"parameters.{name}", self.shared[name]))
            elif default is None:
                raise _fail(field, f"a number: {self.method} needs a `{name}` for every model", None)
            else:
                values.append(default)
        return values

    def shared_value(self, name: str, default: Any, check: Callable[[str, Any], Any]) -> Any:
        """The value of the shared parameter ``name`` (refused per model, where mergekit would ignore it)."""
        for own in self.parameters:
            if name in own:
                raise _fail(f"models[{own['index']}].parameters.{name}", "no per-model value: it is shared"
                            " (set it under the top-level `parameters`)", own[name])
        return check(f"parameters.{name}", self.shared[name]) if name in self.shared else default


def _same(field: str, values: list[float], why: str) -> float:
    if any(v != values[0] for v in values):
        raise MergekitError(f"mergekit field `{field}`: expected the same value for every model ({why}), but got"
                            f" {values}")
    return values[0]


def _linear(config: _Config) -> dict[str, Any]:
    weights = config.per_model("weight", None, _number)
    total = sum(weights)
    if config.shared_value("normalize", True, _flag):
        if abs(total) < 1e-8:
            raise _fail("parameters.normalize", "weights whose sum is not 0 with normalize: true", weights)
        weights = [w / total for w in weights]
    elif abs(total - 1.0) > 1e-6:
        raise MergekitError(f"mergekit field `parameters.normalize`: false with weights summing to {total:g} scales"
                            " the whole model, which is not a merge of task vectors; expected weights summing to 1"
                            " or normalize: true")
    if all(w == weights[0] for w in weights):
        return {"method": "average", "scaling": weights[0] * len(weights)}
    return {"method": "task_arithmetic", "weights": weights, "scaling": 1.0}


def _task_arithmetic(config: _Config) -> dict[str, Any]:
    weights = config.per_model("weight", None, _number)
    if any(d != 1.0 for d in config.per_model("density", 1.0, _number)):
        logging.getLogger(__name__).warning("mergekit's task_arithmetic ignores `density`, and so does this merge")
    scaling = config.shared_value("lambda", 1.0, _number)
    if config.shared_value("normalize", False, _flag):
        total = sum(weights)
        scaling /= total if abs(total) >= 1e-8 else 1.0  # mergekit's guard against a zero sum
    return {"method": "task_arithmetic", "weights": weights, "scaling": scaling}


def _ties(config: _Config) -> dict[str, Any]:
    density = _same("density", config.per_model("density", 1.0, _number), "this project trims every task vector to"
                    " one density")
    if density <= 0:
        raise _fail("density", "a number > 0 (density 0 keeps nothing)", density)
    weight = _same("weight", config.per_model("weight", None, _number), "mergekit's weighted disjoint mean and this"
                   " project's counted one agree only when the weights are equal")
    if weight == 0:
        raise _fail("weight", "a non-zero number", weight)
    if not config.shared_value("normalize", True, _flag):
        raise _fail("parameters.normalize", "true: without it mergekit sums the agreeing values instead of taking"
                    " their mean, which this project's TIES does not", False)
    return {"method": "ties", "density": min(density, 1.0), "scaling": config.shared_value("lambda", 1.0, _number)}


def _svd(config: _Config) -> dict[str, Any]:
    weights = config.per_model("weight", 1.0, _number)
    options = {k: v for k, v in config.shared.items() if k not in ("lambda", "weight")}
    return {"method": config.method, "weights": None if set(weights) == {1.0} else weights,
            "scaling": config.shared_value("lambda", 1.0, _number), **options}


_TRANSLATE = {"linear": _linear, "task_arithmetic": _task_arithmetic, "ties": _ties, "tsv_m": _svd, "sftm": _svd}


def from_mergekit(data: dict[str, Any]) -> dict[str, Any]:
    """This command's config keys (``base``, ``finetuned``, ``method``, ``weights``, ``scaling``, ``density``,
    ``dtype``, ...) for a mergekit config mapping.

    Raises:
        MergekitError: a field with no equivalent here, or of the wrong type, named in the message.

    Example:
        >>> from_mergekit({"merge_method": "ties", "base_model": "b", "parameters": {"density": 0.5, "weight": 1},
        ...                "models": [{"model": "b"}, {"model": "x"}, {"model": "y"}]})
        {'method': 'ties', 'density': 0.5, 'scaling': 1.0, 'base': 'b', 'finetuned': ['x', 'y']}
    """
    config = _Config(data)
    if config.base is None and config.method != "linear":
        raise _fail("base_model", f"a path: {config.method} merges task vectors from the base", None)
    out = _TRANSLATE[config.method](config)
    out["base"], out["finetuned"] = config.base or config.models[0], config.models
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is not None:
        field = "out_dtype" if data.get("out_dtype") else "dtype"
        if dtype not in DTYPES:
            raise _fail(field, f"one of {sorted(DTYPES)}", dtype)
        out["dtype"] = DTYPES[dtype]
    return out
