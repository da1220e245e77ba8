"""Structured logit biases: a bias that is constant over groups of query rows, kept as ``(groups, table)``.

Regional prompts and key masking add biases that depend on a query only through a small label (which regions it
lies in; nothing at all for key masking). :class:`GroupedBias` stores exactly that, so the bias never needs an
Sq x Sk tensor: ``bias[b, h, q, k] = table[b, h, groups[b, q], k]``. Controls may return one from ``logit_bias``;
the processor adds biases with :func:`add_biases` (staying grouped where it can, spelling the bias out where it
cannot) and :func:`attncontrol.core.compute.attention` sends grouped biases to the region-masked kernel or, on the
torch path, spells them out with :meth:`GroupedBias.dense` (same numbers as before there was a structured type).
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass

import torch

from attncontrol.kernels.masked import check_grouped_bias, grouped_bias_dense


@dataclass(frozen=True, eq=False)
class GroupedBias:
    """``bias[b, h, q, k] = table[b, h, groups[b, q], k]``.

    Args:
        groups: ``[B or 1, Sq]`` integer group id of every query row.
        table: ``[B or 1, H or 1, G, Sk]`` float bias of every group over the keys (``-inf`` masks a key; a table
            that requires grad carries its gradient through every path).
        validate: check that every group id lies in ``[0, G)`` (a device sync on CUDA); the helpers that build
            groups themselves skip it.
    """

    groups: torch.Tensor
    table: torch.Tensor
    validate: InitVar[bool] = True

    def __post_init__(self, validate: bool) -> None:
        if self.groups.dim() != 2 or self.table.dim() != 4:
            raise ValueError(
                f"GroupedBias needs `groups` [B, Sq] and `table` [B, H, G, Sk], got {tuple(self.groups.shape)} and "
                f"{tuple(self.table.shape)}"
            )
        batch = max(self.groups.shape[0], self.table.shape[0])
        check_grouped_bias(
            self.groups, self.table, batch=batch, heads=self.table.shape[1], queries=self.groups.shape[1],
            keys=self.table.shape[3], check_values=validate,
        )  # fmt: skip

    @classmethod
    def key_bias(cls, bias: torch.Tensor, queries: int) -> GroupedBias:
        """One group: a per-key bias ``[B, H, 1, Sk]`` (or broadcastable to it) shared by all ``queries`` rows."""
        table = bias.reshape(*(1,) * (4 - bias.dim()), *bias.shape)
        if table.shape[2] != 1:
            raise ValueError(f"a key bias must have one query row, got shape {tuple(bias.shape)}")
        groups = torch.zeros(1, queries, dtype=torch.int32, device=bias.device)
        return cls(groups, table, validate=False)

    @classmethod
    def rows(cls, bias: torch.Tensor) -> GroupedBias:
        """Any dense bias broadcastable to ``[B, H, Sq, Sk]`` as one group per query row (exact, no savings): lets a
        dense bias take the kernel path when a fused backend is asked for explicitly."""
        table = bias.reshape(*(1,) * (4 - bias.dim()), *bias.shape)
        queries = table.shape[2]
        groups = torch.arange(queries, dtype=torch.int32, device=bias.device)[None]
        return cls(groups, table, validate=False)

    @property
    def num_groups(self) -> int:
        return self.table.shape[2]

    @property
    def requires_grad(self) -> bool:
        return self.table.requires_grad

    @property
    def dtype(self) -> torch.dtype:
        return self.table.dtype

    @property
    def device(self) -> torch.device:
        return self.table.device

    def dense(self) -> torch.Tensor:
        """The bias spelled out, ``[B, H or 1, Sq, Sk]``; with one group the ``[B, H or 1, 1, Sk]`` table itself,
        which broadcasts over the queries (no Sq x Sk tensor for key masking)."""
        if self.num_groups == 1:
            return self.table
        return grouped_bias_dense(self.groups, self.table)

    def to(self, dtype: torch.dtype) -> GroupedBias:
        return GroupedBias(self.groups, self.table.to(dtype), validate=False)

    def __add__(self, other: object) -> torch.Tensor | GroupedBias:
        if other is None or isinstance(other, (torch.Tensor, GroupedBias)):
            return add_biases(self, other)
        return NotImplemented

    def __radd__(self, other: object) -> torch.Tensor | GroupedBias:
        if other is None or isinstance(other, torch.Tensor):
            return add_biases(other, self)
        return NotImplemented


def _key_only(bias: torch.Tensor) -> bool:
    """Whether a dense bias has one query row (broadcasts over every query): it can join a table."""
    return bias.dim() <= 4 and (bias.dim() < 2 or bias.shape[-2] == 1)


def _merge(first: GroupedBias, second: GroupedBias) -> GroupedBias:
    """Two grouped biases as one: a query's new group is the pair of its old ones, renumbered over the pairs that
    occur (at most ``min(G1 * G2, B * Sq)`` groups)."""
    if first.groups is second.groups and first.num_groups == second.num_groups:
        return GroupedBias(first.groups, first.table + second.table, validate=False)
    batch = max(first.groups.shape[0], second.groups.shape[0])
    queries = first.groups.shape[1]
    pairs = first.groups.long().expand(batch, queries) * second.num_groups + second.groups.long().expand(batch, queries)
    unique, inverse = torch.unique(pairs, return_inverse=True)
    table = first.table[:, :, unique // second.num_groups] + second.table[:, :, unique % second.num_groups]
    return GroupedBias(inverse.to(torch.int32), table, validate=False)


def add_biases(
    total: torch.Tensor | GroupedBias | None, extra: torch.Tensor | GroupedBias | None
) -> torch.Tensor | GroupedBias | None:
    """``total + extra`` for dense and grouped biases: stays grouped when both are grouped or the dense one is a
    per-key bias; otherwise the grouped one is spelled out (exact either way)."""
    if extra is None:
        return total
    if total is None:
        return extra
    grouped_total, grouped_extra = isinstance(total, GroupedBias), isinstance(extra, GroupedBias)
    if grouped_total and grouped_extra:
        if total.groups.shape[1] != extra.groups.shape[1]:
            raise ValueError(
                f"cannot add grouped biases over {total.groups.shape[1]} and {extra.groups.shape[1]} queries"
            )
        return _merge(total, extra)
    if grouped_total or grouped_extra:
        grouped, dense = (total, extra) if grouped_total else (extra, total)
        if _key_only(dense):
            table = grouped.table + dense.reshape(*(1,) * (4 - dense.dim()), *dense.shape)
            return GroupedBias(grouped.groups, table, validate=False)
        return grouped.dense() + dense if grouped_total else dense + grouped.dense()
    return total + extra


def dense_bias(bias: torch.Tensor | GroupedBias | None) -> torch.Tensor | None:
    """The bias as a tensor broadcastable to ``[B, H, Sq, Sk]`` (what SDPA and the explicit path take)."""
    return bias.dense() if isinstance(bias, GroupedBias) else bias


__all__ = ["GroupedBias", "add_biases", "dense_bias"]
