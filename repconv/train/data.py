"""Data for recovery and training: the model's preprocessing with the user's overrides, the train and
validation sets, and the class-count check (the datasets themselves: :mod:`repconv.data`)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from repconv.checkpoint import CheckpointMeta
from repconv.convert.graph import example_input
from repconv.data import has_split, make_dataset
from repconv.errors import DataError

Spec = tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]]  # input size, mean, std


def data_spec(meta: CheckpointMeta, input_size: int | Sequence[int] | None = None,
              mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Spec:
    """The preprocessing a model expects (its checkpoint metadata), with user overrides."""
    size = meta.input_size if input_size is None else (
        (3, input_size, input_size) if isinstance(input_size, int) else tuple(input_size))
    return tuple(size), tuple(mean or meta.mean), tuple(std or meta.std)


def datasets(data: str | os.PathLike, val_data: str | os.PathLike | None, spec: Spec, labeled: bool):
    """(train set, validation set or None): ``val_data`` wins, else the data's own ``val`` split."""
    train_set = make_dataset(data, "train", *spec, labeled=labeled)
    if val_data is not None:
        val_set = make_dataset(val_data, "val" if has_split(val_data, "val") else "train", *spec, labeled=True,
                               option="val_data")
    elif has_split(data, "val"):
        val_set = make_dataset(data, "val", *spec, labeled=True)
    else:
        val_set = None
    return train_set, val_set


def num_outputs(model: nn.Module, input_size: Sequence[int]) -> int:
    """The classifier's output count, from one forward in eval mode."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        n = int(model(example_input(input_size, batch=1)).shape[-1])
    model.train(was_training)
    return n


def check_classes(sets, model: nn.Module, input_size: Sequence[int]) -> None:
    """DataError when a labeled set's class count differs from the model's outputs."""
    n = num_outputs(model, input_size)
    for ds in sets:
        classes = getattr(ds, "classes", None)
        if ds is not None and classes and len(classes) != n:
            raise DataError(f"the data has {len(classes)} classes ({', '.join(classes[:5])}"
                            f"{', ...' if len(classes) > 5 else ''}) but the model's classifier has {n} outputs",
                            "give data with the model's classes, or distill from the teacher ({option} distill: "
                            "labels unused)", option="objective")
