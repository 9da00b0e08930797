"""Row geometry of a [..., V] logits view whose last dimension is contiguous.

The kernels address a row through at most a few leading strides, so that views such as
``logits[:, :-1]`` are read where they lie instead of being copied. Leading dimensions that
can be merged (stride[i] == stride[i+1] * size[i+1]) are merged; what remains beyond ``levels``
dimensions is enumerated on the host as separate blocks of consecutive rows.
"""

import itertools
import math

import torch


def _merged_leading_dims(x: torch.Tensor) -> tuple[list[int], list[int]]:
    sizes: list[int] = []
    strides: list[int] = []
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        if size == 1:
            continue
        if sizes and strides[-1] == stride * size:
            sizes[-1] *= size
            strides[-1] = stride
        else:
            sizes.append(size)
            strides.append(stride)
    return sizes, strides


def row_blocks(x: torch.Tensor, levels: int) -> list[tuple[torch.Tensor, int]]:
    """Views of ``x`` with exactly ``levels`` leading dimensions, each with its first flat row.

    Together the blocks cover the rows of ``x`` in row-major order of its leading dimensions;
    block k starts at flat row ``first_row`` and holds prod(view.shape[:-1]) consecutive rows.
    No data is copied.
    """
    vocab_size = x.shape[-1]
    sizes, strides = _merged_leading_dims(x)
    if math.prod(x.shape[:-1]) == 0:
        sizes, strides = [0], [0]
    padding = max(0, levels - len(sizes))
    sizes = [1] * padding + sizes
    strides = [0] * padding + strides
    block_sizes, block_strides = sizes[-levels:], strides[-levels:]
    looped_sizes, looped_strides = sizes[:-levels], strides[:-levels]
    rows_per_block = math.prod(block_sizes)
    blocks = []
    for block, index in enumerate(itertools.product(*map(range, looped_sizes))):
        offset = x.storage_offset() + sum(i * s for i, s in zip(index, looped_strides))
        view = x.as_strided([*block_sizes, vocab_size], [*block_strides, 1], offset)
        blocks.append((view, block * rows_per_block))
    return blocks
