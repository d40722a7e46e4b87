"""A small Vision Transformer for 32x32 inputs: torchvision's ``VisionTransformer`` at laptop scale.

Patch 4 (an 8x8 grid of tokens plus the class token), 6 encoder blocks of width 128 with 4 heads. It is
torchvision's own class, so everything repconv does to ``vit_b_16`` (Replacement Learning on the run of
encoder blocks, the parameter-free token mixer) applies unchanged; it exists to test and benchmark those
on the bundled digits data in minutes.
"""

from __future__ import annotations

from torchvision.models import VisionTransformer

from repconv.models import register_model
from repconv.models.cifar_resnet import CIFAR_MEAN, CIFAR_STD


@register_model("cifar_vit", input_size=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD, num_classes=10)
def build(num_classes: int = 10, num_layers: int = 6, hidden_dim: int = 128, num_heads: int = 4,
          mlp_dim: int = 256, patch_size: int = 4, image_size: int = 32) -> VisionTransformer:
    return VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=num_layers,
                             num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim, num_classes=num_classes)
