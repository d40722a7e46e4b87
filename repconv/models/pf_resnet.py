"""The parameter-free ResNet-50s of Han et al. (ICLR 2022), built natively for training from scratch.

``pf_resnet50_max``: the 3x3 conv + BN + ReLU of every bottleneck is a MaxPool2d(3, stride, 1).
``pf_resnet50_hybrid``: stride-1 bottlenecks use MaxPool2d(3, 1, 1); the three downsampling ones keep a
3x3 conv (at stride 1, with its BN and ReLU) placed after AvgPool2d(2, 2).

Module names follow torchvision's ResNet, so a torchvision ``resnet50`` converted with
``--pf-policy all`` / ``hybrid`` has exactly the state_dict keys of these models and loads into them.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.resnet import ResNet, conv1x1, conv3x3

from repconv.models import register_model


class PfBottleneck(nn.Module):
    """torchvision's Bottleneck with its spatial 3x3 conv made parameter-free (``hybrid`` keeps it at stride 2)."""

    expansion = 4
    hybrid = False

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1, norm_layer=None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.stride = stride
        self.keeps_conv = self.hybrid and stride > 1
        if self.keeps_conv:
            self.conv2 = conv3x3(width, width, 1, groups, dilation)
            self.bn2 = norm_layer(width)
        else:
            self.conv2 = nn.MaxPool2d(3, stride, 1)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        if self.keeps_conv:
            out = F.avg_pool2d(out, self.stride, self.stride, 0, ceil_mode=True, count_include_pad=False)
            out = self.relu(self.bn2(self.conv2(out)))
        else:
            out = self.conv2(out)
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class PfBottleneckHybrid(PfBottleneck):
    hybrid = True


@register_model("pf_resnet50_max")
def pf_resnet50_max(num_classes: int = 1000) -> ResNet:
    return ResNet(PfBottleneck, [3, 4, 6, 3], num_classes=num_classes)


@register_model("pf_resnet50_hybrid")
def pf_resnet50_hybrid(num_classes: int = 1000) -> ResNet:
    return ResNet(PfBottleneckHybrid, [3, 4, 6, 3], num_classes=num_classes)
