"""The embedding network of Matching Networks (Vinyals et al., 2016, section 4.1.1).

Four blocks of a 3x3 convolution with 64 filters, batch normalisation, ReLU and
2x2 max-pooling: a 28x28 image becomes a 64-dimensional vector. A larger image leaves a
larger map after the last block (2x2 at 40x40): ``pool="mean"`` averages it into one
vector of ``width``, ``pool="flat"`` keeps it whole, ``width * side**2`` numbers in
the map's order, so where a feature lies in the image stays in the embedding.

The network keeps its weights, and runs its inputs, channels-last: on this CPU that
made inference 1.45-1.9x faster at every batch size, a lone image included, and a
training step 1.1-1.2x faster (``bench/test_hot_paths.py::test_embedding``).
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from ..errors import InvalidValueError

POOLS = ("mean", "flat")
BLOCKS = 4  # the paper's
MOST_FILTERS = 4096  # a block's filters: beyond this a typo, not a model


def check_pool(pool) -> str:
    """``pool`` as a plain str, or InvalidValueError naming the choices."""
    if not isinstance(pool, str) or pool not in POOLS:
        raise InvalidValueError(f"pool must be one of {POOLS}, got {pool!r}")
    return str(pool)


def check_width(width, blocks: int = BLOCKS) -> int | list[int]:
    """``width`` as plain ints: one count of filters for every block, or a list of ``blocks``
    counts, one a block (the last gives the embedding's channels); InvalidValueError otherwise."""
    def count(value) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= MOST_FILTERS:
            raise InvalidValueError(f"width must be a count of filters from 1 to {MOST_FILTERS:,} or a list of "
                                    f"{blocks}, one a block; got {width!r}")
        return int(value)

    if isinstance(width, (list, tuple)):
        if len(width) != blocks:
            raise InvalidValueError(f"width lists the filters of each of the {blocks} blocks, got {len(width)}: "
                                    f"{width!r}")
        return [count(w) for w in width]
    return count(width)


def block_widths(width, blocks: int = BLOCKS) -> list[int]:
    """The filters of each block, from a ``width`` :func:`check_width` accepts."""
    width = check_width(width, blocks)  # a list is a fresh one
    return width if isinstance(width, list) else [width] * blocks


def last_map_side(image_size: int, blocks: int = BLOCKS) -> int:
    """The side of the map ``blocks`` blocks leave of an ``image_size`` square (each 2x2
    max-pooling halves it, rounding down)."""
    return int(image_size) >> blocks


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
        width: filters per block (64 in the paper), or a list of ``blocks`` counts, one a
            block (the last block's gives the embedding's channels).
        blocks: number of blocks (4 in the paper; 28 -> 14 -> 7 -> 3 -> 1).
        pool: how the last block's map becomes the embedding: ``"mean"`` over its positions
            (``width`` numbers, any image size) or ``"flat"``, the whole map
            (``width * side**2``; needs ``image_size``, and takes images of that size only).
        image_size: the square side of the images (for ``pool="flat"``).
    """

    def __init__(self, in_channels: int = 1, width: int | list[int] = 64, blocks: int = BLOCKS, *, pool: str = "mean",
                 image_size: int | None = None):
        super().__init__()
        if isinstance(blocks, bool) or not isinstance(blocks, numbers.Integral) or not 1 <= blocks <= 16:
            raise InvalidValueError(f"blocks must be an integer from 1 to 16, got {blocks!r}")
        blocks = int(blocks)
        pool = check_pool(pool)
        side = None
        if pool == "flat":
            if image_size is None:
                raise InvalidValueError("pool='flat' keeps the last map whole: it needs the image_size")
            if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral):
                raise InvalidValueError(f"image_size must be an integer, got {image_size!r}")
            side = last_map_side(image_size, blocks)
            if side < 1:
                raise InvalidValueError(f"{blocks} blocks leave no map of a {image_size}x{image_size} image")
        widths = block_widths(width, blocks)
        self.net = nn.Sequential(*[conv_block(a, b) for a, b in zip([in_channels] + widths, widths)])
        self.pool, self.side = pool, side
        self.out_dim = widths[-1] if side is None else widths[-1] * side * side
        self.to(memory_format=torch.channels_last)  # weights and inputs channels-last: faster on CPU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed images.

        Args:
            x: (n, C, H, W) or (n, H, W) images.

        Returns:
            (n, out_dim) embeddings (for 28x28 inputs the spatial map is 1x1).
        """
        if x.dim() == 3:
            x = x.unsqueeze(1)
        z = self.net(x.contiguous(memory_format=torch.channels_last))
        if self.pool == "flat":
            if tuple(z.shape[-2:]) != (self.side, self.side):  # another image size: another embedding's length
                raise InvalidValueError(f"this backbone keeps a {self.side}x{self.side} map whole; images of "
                                        f"{tuple(x.shape[-2:])} leave {tuple(z.shape[-2:])}")
            return z.flatten(1)  # channels, then rows and columns of the map
        return z.flatten(2).mean(dim=2)  # 1x1 for 28x28; averages larger maps
