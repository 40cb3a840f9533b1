"""Exact Adam for a parameter whose gradient is row-sparse (fc1 with sparse_grad=True).

A dense fc1 gradient is I × H: at 1M items, 2.4 GB to zero, write and read again in every
encoder step, although only the batch's items (≈ 40k rows) are nonzero. With a row-sparse
gradient this optimizer does exactly what torch.optim.Adam does with the dense one: every row's
moments decay and every row moves (a zero gradient still moves a row whose moments are nonzero;
torch.optim.SparseAdam, which skips such rows, is a different algorithm). It simply never builds
or reads the dense gradient.

The step on a row-sparse gradient is the op `adam_step_row_sparse_` (recvae_fast.ops.row_sparse_adam:
"torch", "cpp" and "triton", chosen as every op's are). Dense gradients take torch.optim.Adam's
arithmetic directly.
"""
from __future__ import annotations

import torch

from .ops.dispatch import check_impl
from .ops.row_sparse_adam import adam_step_row_sparse_, apply_moments_

__all__ = ["RowSparseAdam", "adam_step_row_sparse_"]


class RowSparseAdam(torch.optim.Optimizer):
    """torch.optim.Adam (no amsgrad, no weight decay) for parameters whose gradients may be sparse
    COO tensors sparse in their first dimension (stepped by `adam_step_row_sparse_` with `impl`,
    see recvae_fast.ops.dispatch); dense gradients are stepped as torch.optim.Adam does."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, *, impl: str | None = None):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        self.impl = check_impl("row_sparse_adam", impl)
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
                    apply_moments_(param, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps)
                state["step"] = step
        return loss
