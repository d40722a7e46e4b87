"""Images from files to the normalized batch an artifact expects (torchvision transforms)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from repconv.artifact import ArtifactInfo
from repconv.data import IMAGE_SUFFIXES, eval_transform
from repconv.errors import DataError


def transform_for(info: ArtifactInfo):
    """The artifact's evaluation preprocessing (:func:`repconv.data.eval_transform` with its own spec)."""
    resize = info.extra.get("resize_size")
    return eval_transform(info.input_size, info.mean, info.std, int(resize) if resize else None)


def expand_paths(items: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, folders expanded (recursively, sorted) to the image files inside them."""
    out: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            out.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            out.append(path)
    return out


@dataclass
class ImageBatch:
    tensor: torch.Tensor  # (N, 3, H, W), normalized
    paths: list[Path]
    warnings: list[str]


def load_images(items: Sequence[str | os.PathLike], info: ArtifactInfo) -> ImageBatch:
    """Read every image; a file that is missing or not an image becomes one warning, not a failure.

    Raises DataError when nothing usable is left.
    """
    from PIL import Image, UnidentifiedImageError

    paths = expand_paths(items)
    transform = transform_for(info)
    tensors, used, warnings = [], [], []
    for path in paths:
        try:
            with Image.open(path) as img:
                tensors.append(transform(img.convert("RGB")))
            used.append(path)
        except FileNotFoundError:
            warnings.append(f"'{path}' does not exist; skipped")
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            reason = "not an image file" if isinstance(exc, UnidentifiedImageError) else f"unreadable ({exc})"
            warnings.append(f"'{path}' is {reason}; skipped")
    if not tensors:
        given = ", ".join(str(i) for i in items)
        why = f": {warnings[0]}" + (f" (and {len(warnings) - 1} more)" if len(warnings) > 1 else "") if warnings \
            else ": no image files found"
        raise DataError(f"no usable image in {given}{why}",
                        f"give image files ({', '.join(IMAGE_SUFFIXES[:3])}, ...) or folders holding them")
    return ImageBatch(torch.stack(tensors), used, warnings)
