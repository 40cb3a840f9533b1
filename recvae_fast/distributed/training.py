"""Training a ShardedRecVAE: one step, and `fit_sharded`, the authors' schedule as recvae_fast.fit.

Data parallelism: each global batch of users is cut into contiguous parts, one per rank of the
"data" dimension. Each part's loss is its users' sum divided by the global batch size, so summing
the gradients over the data group gives the gradient of the global batch mean exactly, uneven parts
included. Replicated parameters have the same gradient on every rank of an item group, so summing
over the data group gives every rank the full gradient; a shard's rows are summed over its data
group, the ranks that hold the same rows.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .model import ShardView, ShardedRecVAE


def sharded_backward(model: ShardedRecVAE, view: ShardView, n_batch_users: int, beta=None, gamma=1,
                     dropout_rate: float = 0.5, *, with_kl: bool = True, keep_mask=None, eps=None) -> dict:
    """Backward of this rank's part of a global batch of n_batch_users users; returns the global
    batch's {"mll", "kld" (with_kl), "loss"} as floats (means over all its users)."""
    nll, kl = model.user_terms(view, beta, gamma, dropout_rate, with_kl=with_kl, keep_mask=keep_mask, eps=eps)
    loss = nll.sum() if kl is None else nll.sum() + kl.sum()
    (loss / n_batch_users).backward()
    sums = torch.stack([nll.sum(), kl.sum() if kl is not None else nll.new_zeros(())]).detach()
    if model.layout.data_size > 1:
        dist.all_reduce(sums, group=model.layout.data_group)
    mll, kld = (-sums[0] / n_batch_users).item(), (sums[1] / n_batch_users).item()
    out = {"mll": mll, "loss": kld - mll if with_kl else -mll}
    if with_kl:
        out["kld"] = kld
    return out


def reduce_gradients(model: ShardedRecVAE) -> None:
    """Sum every trainable parameter's gradient over the data group (see the module docstring)."""
    layout = model.layout
    if layout.data_size == 1:
        return
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if param.grad is None:  # a rank whose part of the batch is empty still joins the sum
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad, group=layout.data_group)
