"""Task heads of any shape: checked against the model up front, loaded into it per task, the model's own restored.

Tasks usually have different numbers of classes, so task ``t``'s head (``{"head.weight": (c_t, d), "head.bias":
(c_t,)}``) may not have the shape of the model's current head. :func:`check_heads` validates every task's head
before any work; :class:`HeadSwap` loads one: a tensor of the model's shape is copied into the model's own parameter
(so ties and hooks on it hold), one of another shape replaces the parameter (or buffer) with a new one of the head's
shape, and ``nn.Linear.out_features``/``in_features`` and ``nn.Embedding.num_embeddings``/``embedding_dim`` follow
the weight's shape. :meth:`HeadSwap.restore` puts the model's own tensors back, with their values.

A head may differ from the model only in its first dimension (the classes): ``shape[1:]`` must be the model's, and
within one module the tensors that share the model's first dimension (a weight ``(c, d)`` and its bias ``(c,)``)
must share the head's.

Example:
    >>> import torch
    >>> model = nn.Sequential(nn.Identity(), nn.Linear(4, 3))
    >>> swap = HeadSwap(model, ["1.weight", "1.bias"])
    >>> swap.load({"1.weight": torch.zeros(2, 4), "1.bias": torch.zeros(2)})
    >>> model(torch.ones(1, 4)).shape, model[1].out_features
    (torch.Size([1, 2]), 2)
    >>> swap.restore()
    >>> model(torch.ones(1, 4)).shape, model[1].out_features
    (torch.Size([1, 3]), 3)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["HeadSwap", "check_heads"]

State = Mapping[str, Tensor]

# the module attributes that describe a weight's shape, and which dimension each one is
_SHAPE_ATTRIBUTES: dict[type[nn.Module], dict[str, tuple[str, ...]]] = {
    nn.Linear: {"weight": ("out_features", "in_features")},
    nn.Embedding: {"weight": ("num_embeddings", "embedding_dim")},
}


def check_heads(model: nn.Module, heads: Mapping[str, State] | None, tasks: Sequence[str]) -> None:
    """Check every task's head against ``model`` before any work (see the module's docstring for the rules).

    Raises:
        ValueError: a key the model does not have, a tensor whose dtype kind (floating or not) is not the model's, a
            shape that differs from the model's beyond its first dimension, or a module whose weight and bias
            disagree on the number of classes; each naming the task, the key and what was expected.
        TypeError: a value that is not a tensor.
    """
    known = model.state_dict(keep_vars=True)
    for task in tasks:
        head = (heads or {}).get(task, {})
        for key, value in head.items():
            _check_entry(known, key, value, f"heads[{task!r}]")
        _check_classes(known, head, f"heads[{task!r}]")


def _check_entry(known: Mapping[str, Tensor], key: str, value: object, what: str) -> None:
    if key not in known:
        raise ValueError(f"Expected every key of `{what}` to name a parameter of the model, but got {key!r}.")
    if not isinstance(value, Tensor):
        raise TypeError(f"Expected `{what}[{key!r}]` to be a tensor, but got {type(value).__name__}.")
    model = known[key]
    if value.is_floating_point() != model.is_floating_point():
        kind = "a floating-point" if model.is_floating_point() else f"a {model.dtype}"
        raise ValueError(f"Expected `{what}[{key!r}]` to be {kind} tensor like the model's, but got {value.dtype}.")
    if value.shape == model.shape:
        return
    if value.dim() != model.dim() or value.dim() == 0 or value.shape[1:] != model.shape[1:]:
        raise ValueError(
            f"Expected `{what}[{key!r}]` to have the model's shape {tuple(model.shape)} or differ from it only in"
            f" its first dimension (the classes: {_class_shape(model.shape)}), but got {tuple(value.shape)}."
        )


def _class_shape(shape: torch.Size) -> str:
    """``(classes, d)`` for a model shape ``(c, d)``; ``(classes,)`` for ``(c,)``; ``()`` for a scalar."""
    if not shape:
        return "()"
    return "(classes," + ("" if len(shape) == 1 else " " + ", ".join(str(d) for d in shape[1:])) + ")"


def _check_classes(known: Mapping[str, Tensor], head: State, what: str) -> None:
    """Within a module, the tensors that share the model's first dimension must share the head's."""
    groups: dict[tuple[str, int], dict[str, int]] = {}
    for key, value in head.items():
        if value.dim() > 0:
            module = key.rpartition(".")[0]
            groups.setdefault((module, known[key].shape[0]), {})[key] = value.shape[0]
    for (module, size), classes in groups.items():
        if len(set(classes.values())) > 1:
            shapes = ", ".join(f"{k!r}: {tuple(head[k].shape)}" for k in classes)
            raise ValueError(
                f"Expected the tensors of module {module!r} in `{what}` to have one number of classes (the model's"
                f" share the first dimension {size}), but got {shapes}."
            )


class HeadSwap:
    """Load heads of any shape into ``model`` for the tensors named ``keys``; :meth:`restore` puts its own back.

    Args:
        model: the model; its own tensors of ``keys`` are remembered (objects and values) when this is created.
        keys: the ``state_dict`` names of the head tensors any head may hold.
    """

    def __init__(self, model: nn.Module, keys: Iterable[str]) -> None:
        self.model = model
        state = model.state_dict(keep_vars=True)
        self.original = {key: state[key] for key in keys}
        self.saved = {key: tensor.detach().clone() for key, tensor in self.original.items()}

    def load(self, head: State) -> None:
        """Load ``head`` (checked by :func:`check_heads`): copied into the model's own tensor where it has its
        shape, a new tensor of the head's shape otherwise."""
        for key, value in head.items():
            original = self.original[key]
            if value.shape == original.shape:
                self._put(key, original)
                with torch.no_grad():
                    original.copy_(value)
            else:
                self._put(key, _like(original, value))

    def restore(self) -> None:
        """Put the model's own tensors back (the same objects) with the values they had when this was created."""
        for key, original in self.original.items():
            self._put(key, original)
            with torch.no_grad():
                original.copy_(self.saved[key])

    def _put(self, key: str, tensor: Tensor) -> None:
        path, _, name = key.rpartition(".")
        module = self.model.get_submodule(path)
        if getattr(module, name) is not tensor:
            setattr(module, name, tensor)  # a Parameter replaces a parameter, a tensor a buffer
            _sync_attributes(module, name, tensor.shape)


def _like(original: Tensor, value: Tensor) -> Tensor:
    """A new tensor holding ``value`` on the device and in the dtype of ``original``, a parameter if it is one."""
    data = value.detach().to(device=original.device, dtype=original.dtype, copy=True)
    if isinstance(original, nn.Parameter):
        return nn.Parameter(data, requires_grad=original.requires_grad)
    return data


def _sync_attributes(module: nn.Module, name: str, shape: torch.Size) -> None:
    for kind, attributes in _SHAPE_ATTRIBUTES.items():
        if isinstance(module, kind) and name in attributes:
            for attribute, size in zip(attributes[name], shape, strict=True):
                setattr(module, attribute, int(size))
