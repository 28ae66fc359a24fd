"""Argument checks of :class:`~lightning_merge.evaluation.MergedEvalLoop` and loading states into the model."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

__all__ = ["State", "check_dataloaders", "check_states", "load_state"]

State = Mapping[str, Tensor]


def check_dataloaders(dataloaders: Mapping[str, Iterable], name: str = "dataloaders") -> dict[str, Iterable]:
    named = isinstance(dataloaders, Mapping) and all(isinstance(t, str) for t in dataloaders)
    if not (named and dataloaders):
        raise TypeError(
            f"Expected argument `{name}` to be a non-empty {{task: dataloader}} mapping, but got"
            f" {dataloaders!r}."
        )
    return dict(dataloaders)


def check_states(states: Mapping[str, State] | None, tasks: list[str], name: str) -> dict[str, State] | None:
    if states is None:
        return None
    for task in tasks:
        if task not in states:
            raise ValueError(
                f"Expected argument `{name}` to hold an entry for every task, but task {task!r} has none."
            )
        if not isinstance(states[task], Mapping):
            raise TypeError(
                f"Expected `{name}[{task!r}]` to be a state dict, but got {type(states[task]).__name__}."
            )
    return {task: states[task] for task in tasks}


def load_state(model: nn.Module, state: State, what: str) -> None:
    """Copy ``state`` into the model's parameters and buffers in place (``what`` names the state in errors).

    Raises:
        ValueError: a key the model does not have, or a tensor of another shape.
    """
    known = model.state_dict(keep_vars=True)
    for key, value in state.items():
        if key not in known:
            raise ValueError(
                f"Expected every key of `{what}` to name a parameter of the model, but got {key!r}."
            )
        if tuple(value.shape) != tuple(known[key].shape):
            raise ValueError(
                f"Expected `{what}[{key!r}]` to have the model's shape {tuple(known[key].shape)}, but got"
                f" {tuple(value.shape)}."
            )
    with torch.no_grad():
        for key, value in state.items():
            known[key].copy_(value)
