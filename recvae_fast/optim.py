"""Exact Adam for a parameter whose gradient is row-sparse (fc1 with sparse_grad=True).

A dense fc1 gradient is I × H: at 1M items, 2.4 GB to zero, write and read again in every
encoder step, although only the batch's items (≈ 40k rows) are nonzero. With a row-sparse
gradient this optimizer does exactly what torch.optim.Adam does with the dense one: every row's
moments decay and every row moves (a zero gradient still moves a row whose moments are nonzero;
torch.optim.SparseAdam, which skips such rows, is a different algorithm). It simply never builds
or reads the dense gradient.

The step on a row-sparse gradient is the op `adam_step_row_sparse_`, with three implementations
chosen as every op's are (recvae_fast.ops): "triton" (kernels/row_sparse_adam.py, one pass over
param and moments), "cpp" (the extension recvae_fast._row_sparse_adam, float32/float64, repeated
rows summed without a coalesce) and "torch" (index_add on the moments, then the dense update).
Dense gradients take torch.optim.Adam's arithmetic directly.
"""
from __future__ import annotations

import torch

from . import ops


def _triton_adam_step():
    return ops.import_kernel("row_sparse_adam", "adam_step_row_sparse_")


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
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    *,
    impl: str | None = None,
) -> None:
    """One torch.optim.Adam step (no amsgrad, no weight decay) on the 2-D `param`, in place, with
    `grad` a sparse COO tensor shaped like param and sparse in its first dimension (repeated rows
    are summed). `step` counts from 1; exp_avg / exp_avg_sq are the moments, updated in place."""
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
    impl = ops.resolve_impl("row_sparse_adam", impl, param.device, param.dtype)
    if impl == "torch":
        grad = grad.coalesce()
        rows, values = grad.indices()[0], grad.values()
        exp_avg.mul_(beta1).index_add_(0, rows, values, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).index_add_(0, rows, values * values, alpha=1 - beta2)
        _apply_moments_(param, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps)
        return
    # The kernels read and write contiguous rows; other layouts go through a copy.
    tensors = (param, exp_avg, exp_avg_sq)
    p, m, v = (t if t.is_contiguous() else t.contiguous() for t in tensors)
    if impl == "triton":
        _triton_adam_step()(p, grad, m, v, step, lr=lr, betas=(beta1, beta2), eps=eps)
    else:
        _cpp_step_(p, grad, m, v, step, lr, beta1, beta2, eps)
    for t, buffer in zip(tensors, (p, m, v)):
        if buffer is not t:
            t.copy_(buffer)


def _cpp_step_(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps) -> None:
    from . import custom_ops  # noqa: F401 - registers recvae_fast::row_sparse_adam_step

    if param.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"impl 'cpp' of the row-sparse Adam step takes float32 or float64, got {param.dtype}; "
                        "use impl 'torch'")
    torch.ops.recvae_fast.row_sparse_adam_step(
        param, exp_avg, exp_avg_sq, grad._indices()[0], grad._values(),  # uncoalesced: the C++ sums repeats
        step, lr, beta1, beta2, eps, max(1, torch.get_num_threads()),
    )


def _apply_moments_(param, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps) -> None:
    """Adam's update from the new moments, in the order torch.optim.Adam's single-tensor path uses."""
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


class RowSparseAdam(torch.optim.Optimizer):
    """torch.optim.Adam (no amsgrad, no weight decay) for parameters whose gradients may be sparse
    COO tensors sparse in their first dimension (stepped by `adam_step_row_sparse_` with `impl`,
    see recvae_fast.ops); dense gradients are stepped as torch.optim.Adam does."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, *, impl: str | None = None):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        self.impl = ops.check_impl("row_sparse_adam", impl)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
                grad, exp_avg, exp_avg_sq = param.grad, state["exp_avg"], state["exp_avg_sq"]
                step = state["step"] + 1
                if grad.is_sparse:
                    adam_step_row_sparse_(param, grad, exp_avg, exp_avg_sq, step, lr, (beta1, beta2), eps,
                                          impl=self.impl)
                else:
                    exp_avg.lerp_(grad, 1 - beta1)
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    _apply_moments_(param, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps)
                state["step"] = step
        return loss
