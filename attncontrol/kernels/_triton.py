"""Shared Triton pieces: interpreter-aware configs, the matmul policy and the online-softmax steps.

Imported only when a Triton backend runs (the op modules import it lazily), so ``import attncontrol`` never needs
triton, and ``TRITON_INTERPRET`` is read after the caller had a chance to set it.

Matmul policy (``LOWP``, a constexpr): on a GPU, fp16/bf16 inputs go to the tensor cores in their own dtype with fp32
accumulation; fp32 inputs use exact fp32 (``ieee``) products. Under the interpreter bf16 ``tl.dot`` is wrong (triton
3.9), so bf16 is upcast to fp32 there; fp16 keeps the GPU path, which lets the CPU tests exercise it.
"""

from __future__ import annotations

import inspect
import math

import torch
import triton
import triton.language as tl

from attncontrol.kernels.backend import interpreting

#: evaluated when this module is imported, as triton decides interpreted vs compiled when ``@triton.jit`` runs
INTERPRET = interpreting()

LOG2E = math.log2(math.e)


def lowp(dtype: torch.dtype) -> bool:
    """Whether a kernel on ``dtype`` inputs feeds ``tl.dot`` in that dtype (see the module docstring)."""
    if dtype == torch.float16:
        return True
    return dtype == torch.bfloat16 and not INTERPRET


def pick_configs(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """The autotune candidates: the GPU list, or one config under the interpreter (several fail there)."""
    return [interpreter] if INTERPRET else gpu


def autotune(configs: list[triton.Config], key: list[str], **options: object):
    """``triton.autotune`` keyed per shape; where this triton can (>= 3.2), the chosen config is also kept in its
    on-disk cache, so a new process does not tune the same shape again."""
    if not INTERPRET and "cache_results" in inspect.signature(triton.autotune).parameters:
        options.setdefault("cache_results", True)
    return triton.autotune(configs=configs, key=key, **options)


def pow2(value: int, minimum: int = 16) -> int:
    """Smallest power of two >= ``value`` and >= ``minimum`` (``tl.arange`` sizes; 16 is the GPU's smallest dot)."""
    return max(minimum, triton.next_power_of_2(max(1, int(value))))


def row_strides(tensor: torch.Tensor) -> tuple[int, int, int]:
    """Batch, sequence and head strides of a ``[B, S, H, D]`` tensor whose last dim is contiguous."""
    return tensor.stride(0), tensor.stride(1), tensor.stride(2)


def last_dim_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """Kernels index rows by strides but assume unit stride inside a head; transposed views already satisfy it."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


@triton.jit
def mm(a, b, LOWP: tl.constexpr):
    """``a @ b`` with fp32 accumulation: operands in their (fp16/bf16) dtype when ``LOWP``, exact fp32 otherwise."""
    if LOWP:
        return tl.dot(a, b, out_dtype=tl.float32)
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


@triton.jit
def mm32(a, b, LOWP: tl.constexpr):
    """``a @ b`` of fp32 operands: tf32 tensor cores beside low-precision inputs, exact fp32 otherwise."""
    if LOWP:
        return tl.dot(a, b, input_precision="tf32")
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def softmax_step(acc, m_i, l_i, s, v, LOWP: tl.constexpr):
    """One online-softmax update with logits ``s`` (log2 units, ``-inf`` = masked) against values ``v``.

    A row that has seen only masked keys keeps ``m = -inf``, ``l = 0`` and ``acc = 0``: no NaN is ever formed.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if LOWP:
        p = p.to(v.dtype)
    acc = acc * alpha[:, None] + mm(p, v, LOWP)
    return acc, m_new, l_i


@triton.jit
def row_step(acc, m_i, l_i, s, k, v, do, LOWP: tl.constexpr, DQ: tl.constexpr):
    """Forward (``DQ`` False: ``acc, m_i, l_i`` = output, running max, running sum) or dQ accumulation (``DQ`` True:
    ``acc`` = dQ, ``m_i`` = log2-sum-exp of the row, ``l_i`` = rowsum(dO * O)); ``s`` in log2 units."""
    if DQ:
        p = tl.math.exp2(s - m_i[:, None])
        dp = mm(do, tl.trans(v), LOWP)
        ds = p * (dp - l_i[:, None])
        if LOWP:
            ds = ds.to(k.dtype)
        acc += mm(ds, k, LOWP)
        return acc, m_i, l_i
    return softmax_step(acc, m_i, l_i, s, v, LOWP)


@triton.jit
def kv_step(dk, dv, s, q, do, lse, delta, v, LOWP: tl.constexpr):
    """dK (unscaled) and dV contributions of one query block; returns them and ``ds`` (the logit gradient)."""
    p = tl.math.exp2(s - lse[:, None])
    dp = mm(do, tl.trans(v), LOWP)
    ds = p * (dp - delta[:, None])
    p_in, ds_in = p, ds
    if LOWP:
        p_in, ds_in = p.to(do.dtype), ds.to(q.dtype)
    dv += mm(tl.trans(p_in), do, LOWP)
    dk += mm(tl.trans(ds_in), q, LOWP)
    return dk, dv, ds


@triton.jit
def finish_rows(acc, m_i, l_i):
    """Normalized output and log2-sum-exp; rows that saw no key give 0 and ``+inf`` (so backward's p is 0)."""
    alive = l_i > 0
    out = acc / tl.where(alive, l_i, 1.0)[:, None]
    lse = tl.where(alive, m_i + tl.math.log2(tl.where(alive, l_i, 1.0)), float("inf"))
    return out, lse


#: log2(e) as a compile-time constant: the kernels keep logits in log2 units and use exp2
LOG2E_C: tl.constexpr = tl.constexpr(LOG2E)


def flash_configs(interpreter_block: int = 32) -> list[triton.Config]:
    """FlashAttention-style tile candidates (BLOCK_M x BLOCK_N, warps, stages); one small tile when interpreting."""
    gpu = [
        triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
        for block_m, block_n in ((128, 64), (64, 64), (128, 32), (64, 32), (128, 128))
        for warps in (4, 8)
        for stages in (2, 3)
    ]
    # the last resort for fp32 with wide heads on GPUs with less shared memory than an H100 (A100: 163 KB)
    gpu.append(triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1))
    single = triton.Config({"BLOCK_M": interpreter_block, "BLOCK_N": interpreter_block}, num_warps=4, num_stages=1)
    return pick_configs(gpu, single)


def prune_flash_configs(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """Drop tiles whose q/k/v blocks would not fit on chip for wide heads (head dim padded to 256: 160)."""
    width = max(int(kwargs.get("BLOCK_D", 64)), int(kwargs.get("BLOCK_DV", 64)))
    limit = 64 * 64 if width >= 256 else 128 * 64 if width >= 128 else 128 * 128
    kept = [config for config in configs if config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] <= limit]
    return kept or configs[-1:]
