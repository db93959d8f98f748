"""Reference networks (pure torch.nn, no torchvision)."""

from typing import Sequence

import torch
from torch import nn


def conv_bn_relu(cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class VGGStyle(nn.Module):
    """Stages of two 3x3 conv-BN-ReLU and a 2x2 max-pool, then a two-layer classifier
    on the flattened map (flatten -> Linear -> Linear)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: Sequence[int] = (32, 64, 128),
                 hidden: int = 128, input_size: int = 8):
        super().__init__()
        layers, cin = [], in_channels
        for w in widths:
            layers += [conv_bn_relu(cin, w), conv_bn_relu(w, w), nn.MaxPool2d(2)]
            cin = w
        self.features = nn.Sequential(*layers)
        spatial = input_size // 2 ** len(widths)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(cin * spatial * spatial, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs and a residual add (1x1 projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetStyle(nn.Module):
    """A stem conv, stages of basic blocks (stride 2 between stages), global pool, linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16,
                 blocks: Sequence[int] = (2, 2, 2)):
        super().__init__()
        self.stem = conv_bn_relu(in_channels, width)
        stages, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            for b in range(n):
                stages.append(BasicBlock(cin, cout, stride=2 if (b == 0 and i > 0) else 1))
                cin = cout
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


class MobileNetStyle(nn.Module):
    """Depthwise-separable blocks: 3x3 depthwise conv-BN-ReLU then 1x1 pointwise conv-BN-ReLU."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16,
                 stages: Sequence[tuple] = ((2, 1), (2, 2), (4, 2))):
        super().__init__()
        layers, cin = [conv_bn_relu(in_channels, width)], width
        for mult, stride in stages:
            cout = width * mult
            layers += [conv_bn_relu(cin, cin, 3, stride, groups=cin), conv_bn_relu(cin, cout, 1)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class InceptionBlock(nn.Module):
    """Three branches (1x1; 1x1 -> 3x3; 3x3 max-pool -> 1x1) concatenated on channels."""

    def __init__(self, cin: int, b1: int, b3: int, bp: int):
        super().__init__()
        self.branch1 = conv_bn_relu(cin, b1, 1)
        self.branch3 = nn.Sequential(conv_bn_relu(cin, b3, 1), conv_bn_relu(b3, b3, 3))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn_relu(cin, bp, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch_pool(x)], dim=1)


class ConcatNet(nn.Module):
    """Inception-style net: channel concatenations feeding convs and a linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        self.stem = conv_bn_relu(in_channels, width)
        self.block1 = InceptionBlock(width, width, width, width // 2)
        c1 = width * 2 + width // 2
        self.down = conv_bn_relu(c1, width * 2, 3, stride=2)
        self.block2 = InceptionBlock(width * 2, width * 2, width * 2, width)
        c2 = width * 4 + width
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.down(self.block1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def teacher_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """The digits teacher: a VGG-style CNN of about 1.2 M parameters."""
    return VGGStyle(num_classes, in_channels, widths=(64, 128, 256), hidden=256)


def student_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """The digits student: a small CNN of about 1.9 k parameters (600x fewer than the teacher)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 2 * 2, num_classes),
    )
