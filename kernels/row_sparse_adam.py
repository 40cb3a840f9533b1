"""One exact torch.optim.Adam step for an I × H parameter whose gradient is row-sparse.

The gradient is a COO tensor holding only the rows of the batch's items (as
`sparse_input_layer(..., sparse_grad=True)` gives). Unlike torch.optim.SparseAdam the step is
exact, not lazy: rows without a gradient still decay their moments and move, as they do under
torch.optim.Adam with a dense zero gradient. `_adam_kernel` is one pass over param and its two
moments (read + write each); the dense gradient is never built nor read.

Precision: the hyper-parameters (1 − β1, 1 − β2, lr / bias correction, ...) are computed in Python
(float64) and handed to the kernel as a small tensor of the accumulation dtype, because Triton
passes Python floats as fp32 scalars: `1 − 0.999` in fp32 is 0.00099998713, which moved an fp64
update off torch.optim.Adam by ~1e-5 relative.

Tiles: one fixed config, not autotuned. The step updates its inputs in place, so autotuning would
have to clone and restore three I × H tensors around every trial (2.4 GB each at 1M items, fp32),
and those copies would be timed with the kernel; for a streaming elementwise pass the tile shape
matters little.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ._common import acc_dtypes, on_device

__all__ = ["adam_step_row_sparse_"]

_BLOCK_R, _BLOCK_H, _NUM_WARPS = 16, 128, 4


@triton.jit
def _adam_kernel(
    P, M, V, G, GROW, HYPER, R, H, stride_p, stride_m, stride_v, stride_g,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Rows [r0, r0 + BLOCK_R) of the parameter. GROW[r] is the row of G holding row r's gradient,
    or −1 where the gradient is 0. HYPER (accumulation dtype) = [1 − β1, β2, 1 − β2, weight decay,
    lr / (1 − β1^t), √(1 − β2^t), eps]; the arithmetic is that of torch.optim.Adam's single-tensor
    path (lerp for the first moment)."""
    one_minus_beta1 = tl.load(HYPER + 0)
    beta2 = tl.load(HYPER + 1)
    one_minus_beta2 = tl.load(HYPER + 2)
    weight_decay = tl.load(HYPER + 3)
    step_size = tl.load(HYPER + 4)
    bc2_sqrt = tl.load(HYPER + 5)
    eps = tl.load(HYPER + 6)
    acc = one_minus_beta1.dtype

    r0 = tl.program_id(0).to(tl.int64) * BLOCK_R
    offs_r = r0 + tl.arange(0, BLOCK_R)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    r_mask = offs_r < R
    mask = r_mask[:, None] & (offs_h < H)[None, :]
    grow = tl.load(GROW + offs_r, mask=r_mask, other=-1).to(tl.int64)
    p_ptr = P + offs_r[:, None] * stride_p + offs_h[None, :]
    m_ptr = M + offs_r[:, None] * stride_m + offs_h[None, :]
    v_ptr = V + offs_r[:, None] * stride_v + offs_h[None, :]
    p = tl.load(p_ptr, mask=mask, other=0.0).to(acc)
    m = tl.load(m_ptr, mask=mask, other=0.0).to(acc)
    v = tl.load(v_ptr, mask=mask, other=0.0).to(acc)
    g_mask = mask & (grow >= 0)[:, None]
    g = tl.load(G + grow[:, None] * stride_g + offs_h[None, :], mask=g_mask, other=0.0).to(acc)
    g = g + weight_decay * p
    m = m + one_minus_beta1 * (g - m)  # torch's lerp
    v = v * beta2 + one_minus_beta2 * g * g
    denom = tl.sqrt(v) / bc2_sqrt + eps
    p = p - step_size * (m / denom)
    tl.store(p_ptr, p.to(P.dtype.element_ty), mask=mask)
    tl.store(m_ptr, m.to(M.dtype.element_ty), mask=mask)
    tl.store(v_ptr, v.to(V.dtype.element_ty), mask=mask)


def adam_hyperparameters(lr, betas, eps, weight_decay, step, dtype, device) -> torch.Tensor:
    """The kernel's HYPER tensor: every scalar computed in Python float64, stored in `dtype`."""
    beta1, beta2 = (float(b) for b in betas)
    values = [1.0 - beta1, beta2, 1.0 - beta2, float(weight_decay), float(lr) / (1.0 - beta1**step),
              (1.0 - beta2**step) ** 0.5, float(eps)]
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


@torch.no_grad()
def adam_step_row_sparse_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> None:
    """One step of torch.optim.Adam (amsgrad=False, maximize=False) on the 2-D `param`, in place,
    with `grad` a COO gradient sparse in its first dimension. `step` counts from 1 (bias
    corrections). The moments are shaped like param (fp32 or fp64) with contiguous rows; the
    update is computed in fp64 for fp64 parameters, in fp32 otherwise."""
    if grad.layout != torch.sparse_coo or grad.shape != param.shape or param.dim() != 2:
        raise ValueError("grad must be a sparse COO tensor shaped like the 2-D param")
    if exp_avg.shape != param.shape or exp_avg_sq.shape != param.shape:
        raise ValueError("exp_avg and exp_avg_sq must be shaped like param")
    devices = {t.device for t in (param, grad, exp_avg, exp_avg_sq)}
    if len(devices) != 1:
        raise ValueError(f"param, grad and the moments must be on one device, got {sorted(map(str, devices))}")
    for t in (param, exp_avg, exp_avg_sq):
        if t.stride(1) != 1:
            raise ValueError("param and moments must have contiguous rows")
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    if not grad.is_coalesced():
        # AccumulateGrad drops the coalesced flag when it stores a sparse .grad (torch behaviour),
        # so a .grad from `sparse_grad=True` lands here although its rows are already unique; this
        # costs a sort of the U row indices and a copy of the U × H values (not I-sized).
        grad = grad.coalesce()
    rows, values = grad.indices()[0], grad.values()
    if values.dim() != 2:
        raise ValueError("grad must be sparse in its first dimension only (hybrid COO with dense rows)")
    n_rows, hidden = param.shape
    if not (n_rows and hidden):
        return
    hyper = adam_hyperparameters(lr, betas, eps, weight_decay, step, acc_dtypes(param.dtype)[0], param.device)
    row_sparse_adam_step_op(param, exp_avg, exp_avg_sq, rows, values.contiguous(), hyper)


# Registered op (torch.library.triton_op, in place): visible by name to the profiler, checked by
# opcheck, traceable by torch.compile through wrap_triton.
@triton_op("recvae_fast::triton_row_sparse_adam_step", mutates_args=("param", "exp_avg", "exp_avg_sq"))
def row_sparse_adam_step_op(
    param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, rows: Tensor, grad_values: Tensor, hyper: Tensor,
) -> None:
    """The step on param's rows `rows` (unique) with gradient rows `grad_values` [len(rows), H]; every
    other row steps with a zero gradient. `hyper`: adam_hyperparameters(...)."""
    n_rows, hidden = param.shape
    grow = torch.full((n_rows,), -1, dtype=torch.int32, device=param.device)
    grow[rows] = torch.arange(rows.numel(), dtype=torch.int32, device=param.device)
    grid = (triton.cdiv(n_rows, _BLOCK_R), triton.cdiv(hidden, _BLOCK_H))
    with on_device(param):
        wrap_triton(_adam_kernel)[grid](
            param, exp_avg, exp_avg_sq, grad_values, grow, hyper, n_rows, hidden,
            param.stride(0), exp_avg.stride(0), exp_avg_sq.stride(0),
            grad_values.stride(0) if grad_values.numel() else hidden,
            BLOCK_R=_BLOCK_R, BLOCK_H=_BLOCK_H, num_warps=_NUM_WARPS,
        )


@row_sparse_adam_step_op.register_fake  # see kernels/multinomial_nll.py: the interpreter needs it
def _(param, exp_avg, exp_avg_sq, rows, grad_values, hyper):
    return None
