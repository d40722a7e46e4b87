"""Images from files to the normalized batch an artifact expects (torchvision transforms)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.transforms import v2 as T

from repconv.errors import DataError
from repconv.runtime.metadata import ArtifactInfo

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
CROP_FRACTION = 0.875  # torchvision's ImageNet preset: resize 256, crop 224


def transform_for(info: ArtifactInfo) -> T.Compose:
    """Resize the short side to size / 0.875, center-crop to size, scale to [0, 1], normalize."""
    _, h, w = info.input_size
    resize = int(info.extra.get("resize_size") or round(max(h, w) / CROP_FRACTION))
    return T.Compose([T.ToImage(), T.Resize(resize, antialias=True), T.CenterCrop((h, w)),
                      T.ToDtype(torch.float32, scale=True), T.Normalize(list(info.mean), list(info.std))])


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
