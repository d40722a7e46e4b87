"""repconv: Replacement Learning and parameter-free layers for pretrained PyTorch vision models."""

from repconv._package import install
from repconv._version import __version__ as __version__

install(__name__)  # the public API (repconv.api) on first use; repconv.convert/export/train callable
