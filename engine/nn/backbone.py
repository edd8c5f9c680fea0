"""The embedding network of Matching Networks (Vinyals et al., 2016, section 4.1.1).

Four blocks of a 3x3 convolution with 64 filters, batch normalisation, ReLU and
2x2 max-pooling: a 28x28 image becomes a 64-dimensional vector.

The network keeps its weights, and runs its inputs, channels-last: on this CPU that
made inference 1.45-1.9x faster at every batch size, a lone image included, and a
training step 1.1-1.2x faster (``bench/test_hot_paths.py::test_embedding``).
"""

from __future__ import annotations

import torch
from torch import nn


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class ConvEmbedding(nn.Module):
    """The paper's 4-block convolutional embedding.

    Args:
        in_channels: image channels (1 for Omniglot and Fashion-MNIST).
        width: filters per block (64 in the paper).
        blocks: number of blocks (4 in the paper; 28 -> 14 -> 7 -> 3 -> 1).
    """

    def __init__(self, in_channels: int = 1, width: int = 64, blocks: int = 4):
        super().__init__()
        layers = [conv_block(in_channels, width)] + [conv_block(width, width) for _ in range(blocks - 1)]
        self.net = nn.Sequential(*layers)
        self.out_dim = width
        self.to(memory_format=torch.channels_last)  # weights and inputs channels-last: faster on CPU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed images.

        Args:
            x: (n, C, H, W) or (n, H, W) images.

        Returns:
            (n, width) embeddings (for 28x28 inputs the spatial map is 1x1).
        """
        if x.dim() == 3:
            x = x.unsqueeze(1)
        z = self.net(x.contiguous(memory_format=torch.channels_last))
        return z.flatten(2).mean(dim=2)  # 1x1 for 28x28; averages larger maps
