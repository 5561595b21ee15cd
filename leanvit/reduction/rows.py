"""Reading and writing whole token rows of a batch of sequences by per-sample indices.

Token reduction moves whole rows: ToMe gathers the tokens it keeps and adds the merged ones into their
partners, EViT writes kept tokens back onto the patch grid, unmerging copies each merged token back to its
patches. ``torch.gather`` / ``scatter`` with an index expanded over the channels do this element by element;
viewing the batch as one (B * N, C) table of rows and calling ``index_select`` / ``index_copy`` /
``index_add_`` with flat row numbers moves contiguous rows instead. Same values (``add_rows_`` adds in index
order, as ``scatter_add_`` does); on 2 CPU threads 5-10x faster for reads and 2-5x for writes
(``python benchmarks/bench_tome.py --rows``). All three have gradients, and export (``torch.export``, ONNX run
by onnxruntime: checked to give the same values).
"""
from __future__ import annotations

import torch

__all__ = ["flat_rows", "take_rows", "put_rows", "put_rows_", "add_rows_"]


def flat_rows(index: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Row numbers in the (B * seq_len, C) table of the per-sample indices ``index`` (B, M), flattened."""
    offsets = torch.arange(0, index.shape[0] * seq_len, seq_len, device=index.device, dtype=index.dtype)
    return (index + offsets.unsqueeze(1)).reshape(-1)


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` (B, N, C) at rows ``index`` (B, M) of each sample: (B, M, C), a new tensor
    (``x.gather(1, index[..., None].expand(-1, -1, C))``)."""
    B, N, C = x.shape
    return x.reshape(B * N, C).index_select(0, flat_rows(index, N)).view(B, index.shape[1], C)


def put_rows(x: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` (B, N, C) whose rows ``index`` (B, M) hold ``src`` (B, M, C)
    (``x.scatter(1, index[..., None].expand(-1, -1, C), src)``; out of place). Where ``index`` repeats a row
    in a sample, which of its sources lands there is not defined, as with ``scatter``."""
    B, N, C = x.shape
    flat = src.reshape(-1, C)
    return x.reshape(B * N, C).index_copy(0, flat_rows(index, N), flat).view(B, N, C)


def put_rows_(x: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """:func:`put_rows` in place on ``x`` (contiguous); returns ``x``."""
    B, N, C = x.shape
    x.view(B * N, C).index_copy_(0, flat_rows(index, N), src.reshape(-1, C))
    return x


def add_rows_(x: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Add ``src`` (B, M, C) to the rows ``index`` (B, M) of ``x`` (B, N, C), in place; returns ``x``
    (``x.scatter_add_(1, index[..., None].expand(-1, -1, C), src)``). ``x`` must be contiguous."""
    B, N, C = x.shape
    x.view(B * N, C).index_add_(0, flat_rows(index, N), src.reshape(-1, C))
    return x
