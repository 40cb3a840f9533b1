"""One exact torch.optim.Adam step (no amsgrad, no weight decay) on a parameter whose gradient is
row-sparse (a sparse COO tensor sparse in its first dimension): every row's moments decay and every
row moves, as with the dense gradient, without building or reading the dense gradient.

    impl "torch"   index_add on the moments, then the dense update
    impl "cpp"     the extension recvae_fast._row_sparse_adam, float32/float64, repeated rows summed
                   without a coalesce
    impl "triton"  kernels/row_sparse_adam.py, one pass over param and moments
                   (registered there as recvae_fast::triton_row_sparse_adam_step)

"cpp" runs as the registered op

    recvae_fast::row_sparse_adam_step(param!, exp_avg!, exp_avg_sq!, rows, grad_values, step, lr,
                                      beta1, beta2, eps, num_threads) -> ()
        in place; no autograd.

The optimizer around it is recvae_fast.optim.RowSparseAdam.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import import_kernel, resolve_impl


def _check_moments(param, exp_avg, exp_avg_sq) -> None:
    if param.dim() != 2:
        raise ValueError(f"the row-sparse Adam step takes a 2-D parameter, got shape {tuple(param.shape)}")
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.shape != param.shape or t.dtype != param.dtype or t.device != param.device:
            raise ValueError(
                f"{name} must match the parameter ({tuple(param.shape)}, {param.dtype}, {param.device}), "
                f"got {tuple(t.shape)}, {t.dtype}, {t.device}"
            )


@torch.no_grad()
def adam_step_row_sparse_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    *,
    impl: str | None = None,
) -> None:
    """One torch.optim.Adam step (no amsgrad, no weight decay) on the 2-D `param`, in place, with
    `grad` a sparse COO tensor shaped like param and sparse in its first dimension (repeated rows
    are summed). `step` counts from 1; exp_avg / exp_avg_sq are the moments, updated in place.
    impl: see recvae_fast.ops.dispatch."""
    if not grad.is_sparse or grad.sparse_dim() != 1 or grad.shape != param.shape:
        raise ValueError(
            f"the row-sparse Adam step needs a sparse COO gradient shaped like its parameter {tuple(param.shape)} "
            f"and sparse in its first dimension only (sparse_dim 1), got {tuple(grad.shape)}"
            + (f" with sparse_dim {grad.sparse_dim()}" if grad.is_sparse else " (dense)")
        )
    _check_moments(param, exp_avg, exp_avg_sq)
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    beta1, beta2 = betas
    impl = resolve_impl("row_sparse_adam", impl, param.device, param.dtype)
    if impl == "torch":
        grad = grad.coalesce()
        rows, values = grad.indices()[0], grad.values()
        exp_avg.mul_(beta1).index_add_(0, rows, values, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).index_add_(0, rows, values * values, alpha=1 - beta2)
        apply_moments_(param, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps)
        return
    # The kernels read and write contiguous rows; other layouts go through a copy.
    tensors = (param, exp_avg, exp_avg_sq)
    p, m, v = (t if t.is_contiguous() else t.contiguous() for t in tensors)
    if impl == "triton":
        import_kernel("row_sparse_adam", "adam_step_row_sparse_")(p, grad, m, v, step, lr=lr, betas=(beta1, beta2),
                                                                   eps=eps)
    else:
        torch.ops.recvae_fast.row_sparse_adam_step(
            p, m, v, grad._indices()[0], grad._values(),  # uncoalesced: the C++ sums repeats
            step, lr, beta1, beta2, eps, max(1, torch.get_num_threads()),
        )
    for t, buffer in zip(tensors, (p, m, v)):
        if buffer is not t:
            t.copy_(buffer)


def apply_moments_(param, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps) -> None:
    """Adam's update from the new moments, in the order torch.optim.Adam's single-tensor path uses."""
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


# ----------------------------------------------------------------------------- the registered op


@torch.library.custom_op(
    "recvae_fast::row_sparse_adam_step", mutates_args=("param", "exp_avg", "exp_avg_sq"), device_types="cpu"
)
def _row_sparse_adam_step_op(
    param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, rows: Tensor, grad_values: Tensor,
    step: int, lr: float, beta1: float, beta2: float, eps: float, num_threads: int,
) -> None:
    from .. import _row_sparse_adam  # loaded on first use, not when the package is imported

    for name, t in (("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not t.is_contiguous():
            raise ValueError(f"recvae_fast::row_sparse_adam_step: {name} must be contiguous")
    _row_sparse_adam.adam_step_row_sparse(
        param.detach().numpy(), exp_avg.detach().numpy(), exp_avg_sq.detach().numpy(),
        rows.numpy(), grad_values.detach().contiguous().numpy(),  # repeated rows: the C++ sums them
        lr, beta1, beta2, eps, step, num_threads,
    )


@_row_sparse_adam_step_op.register_fake
def _(param, exp_avg, exp_avg_sq, rows, grad_values, step, lr, beta1, beta2, eps, num_threads):
    return None
