"""The networks (`model.arch`): `tutorial`, Net, three 3x3 convs with ReLU and max-pooling then three
linear layers; `fast`, FastNet; `fast3`, Fast3Net; `wide`, WideNet; `deep`, DeepNet; `vgg`, VGGNet. All
take raw 28x28 pixels and give 10 logits."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.data.datasets import IMAGE_SIZE, NUM_CLASSES
from pipeline.params import ModelConfig

FAST_CROP = 2  # FastNet drops this many border pixels on each side


class Net(nn.Module):
    """Takes raw pixels (B, 1, 28, 28) in [0, 255], any dtype; returns logits (B, 10)."""

    def __init__(self, nf: int = 32) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, nf, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(nf, nf, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, nf, 14, 14)
            nn.Conv2d(nf, nf, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, nf, 7, 7)
        )
        side = IMAGE_SIZE // 4  # two 2x2 poolings
        self.linears = nn.Sequential(
            nn.Linear(nf * side * side, 100),
            nn.ReLU(),
            nn.Linear(100, 50),
            nn.ReLU(),
            nn.Linear(50, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Scaling lives in the model, so every user of it (evaluate, MLflow serving) feeds raw
        # pixels: (x / 255 - 0.5) / 0.5 maps [0, 255] to [-1, 1] as the tutorial's Normalize.
        x = x.float() / 127.5 - 1.0
        x = self.convs(x)
        x = x.flatten(1)  # (B, nf * 7 * 7)
        return self.linears(x)


class FastNet(nn.Module):
    """A speed-tuned option (`model.arch: fast`), same input and output contract as Net.

    Each choice cuts work on a CPU, where the small layers are bound by memory traffic, not
    multiply-adds (see bench/): it sees the central 24x24 pixels (MNIST digits are centred in a
    20x20 box) and downsamples with stride-2 convs instead of max-pooling, whose forward and
    backward passes took a quarter of the step time.
    """

    def __init__(self, nf: int = 16, convs_at_6x6: int = 0) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            *conv_bn_relu(1, nf, kernel=5, stride=2, padding=2),  # (B, nf, 12, 12)
            *conv_bn_relu(nf, 2 * nf, stride=2),  # (B, 2nf, 6, 6)
            *(m for _ in range(convs_at_6x6) for m in conv_bn_relu(2 * nf, 2 * nf)),  # (B, 2nf, 6, 6)
        )
        side = (IMAGE_SIZE - 2 * FAST_CROP) // 4
        self.head = nn.Sequential(
            nn.Linear(2 * nf * side * side, 128),
            nn.ReLU(),
            nn.Linear(128, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[..., FAST_CROP:-FAST_CROP, FAST_CROP:-FAST_CROP]  # (B, 1, 24, 24)
        x = x.float() / 127.5 - 1.0  # [0, 255] -> [-1, 1], as Net
        return self.head(self.convs(x).flatten(1))  # (B, 2nf * 6 * 6) -> (B, 10)


class Fast3Net(FastNet):
    """FastNet with a third conv (`model.arch: fast3`), a 3x3 conv-BN-ReLU at 6x6 and 2nf channels:
    at nf 16, 0.70 M multiply-adds an image (FastNet's 0.37 M) for 1.2-1.4x FastNet's training time
    at the same batch (bf16, 2 CPU cores), where these small layers cost memory traffic more than
    arithmetic; the `accurate` recipe."""

    def __init__(self, nf: int = 16) -> None:
        super().__init__(nf, convs_at_6x6=1)


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, padding: int = 1) -> list[nn.Module]:
    """A conv (by default 3x3 keeping the size), batch norm (so no conv bias), ReLU."""
    conv = nn.Conv2d(c_in, c_out, kernel_size=kernel, stride=stride, padding=padding, bias=False)
    return [conv, nn.BatchNorm2d(c_out), nn.ReLU()]


def pooled_stages(nf: int, blocks: tuple[int, ...]) -> nn.Sequential:
    """3x3 conv-BN-ReLU blocks keeping the size, blocks[i] of them at nf * 2**i channels, a 2x2
    max-pool between stages (28x28, 14x14, 7x7 for three), then a global average: (B, C, 1, 1)."""
    layers: list[nn.Module] = []
    channels = 1
    for i, n in enumerate(blocks):
        if i:
            layers.append(nn.MaxPool2d(2))
        for _ in range(n):
            layers += conv_bn_relu(channels, nf * 2**i)
            channels = nf * 2**i
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1))


class ConvsAndLinear(nn.Module):
    """What the wide, deep and vgg networks share: pixels scaled as Net's, `convs` down to (B, C, 1, 1),
    then one linear layer `head` from those C features to the logits."""

    def __init__(self, convs: nn.Sequential, features: int) -> None:
        super().__init__()
        self.convs = convs
        self.head = nn.Linear(features, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 127.5 - 1.0  # [0, 255] -> [-1, 1], as Net
        return self.head(self.convs(x).flatten(1))  # (B, C) -> (B, 10)


class WideNet(ConvsAndLinear):
    """The capacity for augmentation (`model.arch: wide`), same contract as Net: five 3x3
    conv-BN-ReLU blocks, nf channels at 28x28, 2nf at 14x14, 4nf at 7x7, then a global average
    and one linear layer. At nf 16: 5.5 M multiply-adds an image (FastNet's 0.37 M, Net's 9.4 M at
    nf 32) and 36 k weights; at nf 32, 22 M and 140 k."""

    def __init__(self, nf: int = 32) -> None:
        super().__init__(pooled_stages(nf, blocks=(2, 2, 1)), 4 * nf)  # convs to (B, 4nf, 1, 1)


class DeepNet(ConvsAndLinear):
    """Seven conv-BN-ReLU blocks (`model.arch: deep`), same contract as Net: two unpadded 3x3 convs
    at nf channels and a strided 5x5 that halves the size, the same at 2nf, then a 4x4 conv at 4nf
    that sees the whole 4x4 map (a dense layer over it) and one linear layer. Learned downsampling
    instead of WideNet's max-pooling, and most of the width where the maps are small. At nf 16:
    3.8 M multiply-adds an image (WideNet's 5.5 M) and 82 k weights (36 k)."""

    def __init__(self, nf: int = 16) -> None:
        convs = nn.Sequential(
            *conv_bn_relu(1, nf, padding=0),  # (B, nf, 26, 26)
            *conv_bn_relu(nf, nf, padding=0),  # (B, nf, 24, 24)
            *conv_bn_relu(nf, nf, kernel=5, stride=2, padding=2),  # (B, nf, 12, 12)
            *conv_bn_relu(nf, 2 * nf, padding=0),  # (B, 2nf, 10, 10)
            *conv_bn_relu(2 * nf, 2 * nf, padding=0),  # (B, 2nf, 8, 8)
            *conv_bn_relu(2 * nf, 2 * nf, kernel=5, stride=2, padding=2),  # (B, 2nf, 4, 4)
            *conv_bn_relu(2 * nf, 4 * nf, kernel=4, padding=0),  # (B, 4nf, 1, 1)
        )
        super().__init__(convs, 4 * nf)


class VGGNet(ConvsAndLinear):
    """Most of the width where the maps are small (`model.arch: vgg`), same contract as Net: one 3x3
    conv-BN-ReLU at nf channels on 28x28, two at 2nf on 14x14, two at 4nf on 7x7 (max-pooling
    between), a global average and one linear layer. At nf 32: 22 M multiply-adds an image and
    279 k weights (WideNet at nf 24: 12 M and 79 k), yet an epoch about as long on a CPU, where the
    28x28 maps' memory traffic bounds the step and only one conv runs there (docs/performance.md);
    the `fashion-best` recipe."""

    def __init__(self, nf: int = 32) -> None:
        super().__init__(pooled_stages(nf, blocks=(1, 2, 2)), 4 * nf)  # convs to (B, 4nf, 1, 1)


NETWORKS = {"tutorial": Net, "fast": FastNet, "fast3": Fast3Net, "wide": WideNet, "deep": DeepNet, "vgg": VGGNet}


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the network the model section describes."""
    return NETWORKS[cfg.arch](cfg.nf)
