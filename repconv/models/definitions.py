"""Importing this module registers every model repconv defines itself."""

from repconv.models import (
    cifar_resnet,  # noqa: F401
    cifar_vit,  # noqa: F401
    pf_resnet,  # noqa: F401
)
