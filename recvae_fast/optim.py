"""Exact Adam for a parameter whose gradient is row-sparse (fc1 with sparse_grad=True).

A dense fc1 gradient is I × H: at 1M items, 2.4 GB to zero, write and read again in every
encoder step, although only the batch's items (≈ 40k rows) are nonzero. With a row-sparse
gradient this optimizer does exactly what torch.optim.Adam does with the dense one: every row's
moments decay and every row moves (a zero gradient still moves a row whose moments are nonzero;
torch.optim.SparseAdam, which skips such rows, is a different algorithm). It simply never builds
or reads the dense gradient. The update is one pass over param and moments: a Triton kernel on CUDA
(kernels/row_sparse_adam.adam_step_row_sparse_), the C++ extension recvae_fast._row_sparse_adam
on the CPU for float32/float64; other cases (half-precision CPU parameters, non-contiguous ones,
dense gradients) take torch ops with the same arithmetic.
"""
from __future__ import annotations

import torch

from . import _row_sparse_adam


class RowSparseAdam(torch.optim.Optimizer):
    """torch.optim.Adam (no amsgrad, no weight decay) for 2-D parameters with sparse COO gradients
    sparse in their first dimension; dense gradients are accepted too."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
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
                grad = param.grad
                if grad.is_sparse and (grad.sparse_dim() != 1 or grad.shape != param.shape):
                    raise ValueError(
                        f"RowSparseAdam needs a gradient shaped like its parameter {tuple(param.shape)} and sparse in "
                        f"its first dimension only (sparse_dim 1), got {tuple(grad.shape)} with sparse_dim "
                        f"{grad.sparse_dim()}")
                state["step"] += 1
                if grad.is_sparse and param.is_cuda:
                    from .kernels.row_sparse_adam import adam_step_row_sparse_

                    adam_step_row_sparse_(param, grad, state["exp_avg"], state["exp_avg_sq"], state["step"],
                                          lr=lr, betas=(beta1, beta2), eps=eps)
                    continue
                if grad.is_sparse and _cpu_kernel_applies(param, state):
                    # Repeated rows are summed by the kernel: no coalesce (slow on the CPU).
                    _row_sparse_adam.adam_step_row_sparse(
                        param.detach().numpy(), state["exp_avg"].numpy(), state["exp_avg_sq"].numpy(),
                        grad._indices()[0].numpy(), grad._values().contiguous().numpy(),
                        lr, beta1, beta2, eps, state["step"], max(1, torch.get_num_threads()))
                    continue
                _adam_update_(param, grad, state["exp_avg"], state["exp_avg_sq"], state["step"], lr, beta1, beta2, eps)
        return loss


def _cpu_kernel_applies(param, state) -> bool:
    """The C++ step takes CPU float32/float64 tensors with C-contiguous storage."""
    return (param.device.type == "cpu" and param.dtype in (torch.float32, torch.float64) and param.dim() == 2
            and all(t.is_contiguous() for t in (param, state["exp_avg"], state["exp_avg_sq"])))


def _adam_update_(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps):
    """Adam's arithmetic, in the order torch.optim.Adam's single-tensor path uses."""
    if grad.is_sparse:
        grad = grad.coalesce()
        rows, values = grad.indices()[0], grad.values()
        exp_avg.mul_(beta1)
        exp_avg.index_add_(0, rows, values, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2)
        exp_avg_sq.index_add_(0, rows, values * values, alpha=1 - beta2)
    else:
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
