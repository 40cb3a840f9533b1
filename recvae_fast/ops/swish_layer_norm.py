"""The encoder's layer tail: y = LayerNorm(swish(linear(pre) + residual)), or LayerNorm(swish(pre)).

    impl "torch"   torch ops (silu, then nn.LayerNorm)
    impl "cpp"     the linear layer's product alone, then the rest in one C++ pass per row
                   (csrc/swish_layer_norm.cpp)

"cpp" runs as the registered ops

    recvae_fast::swish_layer_norm(pre, linear_bias?, residual?, weight, bias, eps, keep_s)
                                  -> (y, s, mean, rstd)
        y = LayerNorm(swish(pre + linear_bias + residual)); differentiable in pre, linear_bias,
        residual, weight and bias when keep_s kept s (what backward needs).
    recvae_fast::swish_layer_norm_backward(grad_y, s, mean, rstd, weight)
        -> (grad_s, grad_weight, grad_bias, grad_linear_bias): its backward, one op.

Under torch.autocast both compute in float32 (a bf16 product's output is widened): LayerNorm's
statistics stay float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..precision import register_float32_autocast
from .dispatch import compute_dtype, resolve_impl


def swish(x: Tensor) -> Tensor:
    """x·sigmoid(x), as torch's one fused op (silu) rather than a sigmoid and a multiply."""
    return F.silu(x)


def swish_layer_norm(pre: Tensor, norm: nn.LayerNorm, linear: nn.Linear | None = None,
                     residual: Tensor | None = None, *, impl: str | None = None) -> Tensor:
    """norm(swish(linear(pre) + residual)), or norm(swish(pre)) without linear and residual.
    impl: see recvae_fast.ops.dispatch ("cpp" needs a LayerNorm with weight and bias)."""
    affine = norm.weight is not None and norm.bias is not None
    if impl is None and not affine:
        impl = "torch"
    impl = resolve_impl("swish_layer_norm", impl, pre.device, compute_dtype(pre))
    if impl == "torch":
        out = pre if linear is None else linear(pre)
        return norm(swish(out if residual is None else out + residual))
    if not affine:
        raise ValueError("swish_layer_norm: impl 'cpp' needs a LayerNorm with weight and bias "
                         "(elementwise_affine=True); use impl 'torch'")
    if linear is not None:  # the product alone: its bias is added in the fused pass, not copied in
        pre, linear_bias = F.linear(pre, linear.weight), linear.bias
    else:
        linear_bias = None
    keep_s = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (pre, linear_bias, residual, norm.weight, norm.bias))
    y, *_ = torch.ops.recvae_fast.swish_layer_norm(pre, linear_bias, residual, norm.weight, norm.bias, norm.eps, keep_s)
    return y


# ----------------------------------------------------------------------------- the registered ops


def _array_or_none(t: Tensor | None):
    return None if t is None else t.detach().contiguous().numpy()


@torch.library.custom_op("recvae_fast::swish_layer_norm", mutates_args=(), device_types="cpu")
def _swish_layer_norm_op(
    pre: Tensor, linear_bias: Tensor | None, residual: Tensor | None, weight: Tensor, bias: Tensor, eps: float,
    keep_s: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from .. import _swish_layer_norm  # loaded on first use, not when the package is imported

    n_rows, width = pre.shape
    y = pre.new_empty(n_rows, width)
    s = pre.new_empty(n_rows, width) if keep_s else pre.new_empty(0)
    mean, rstd = pre.new_empty(n_rows), pre.new_empty(n_rows)
    _swish_layer_norm.forward(
        pre.detach().contiguous().numpy(), _array_or_none(linear_bias), _array_or_none(residual),
        weight.detach().contiguous().numpy(), bias.detach().contiguous().numpy(), eps,
        y.numpy(), s.numpy() if keep_s else None, mean.numpy(), rstd.numpy(), torch.get_num_threads(),
    )
    return y, s, mean, rstd


@_swish_layer_norm_op.register_fake
def _(pre, linear_bias, residual, weight, bias, eps, keep_s):
    n_rows, width = pre.shape
    return (pre.new_empty(n_rows, width), pre.new_empty((n_rows, width) if keep_s else (0,)),
            pre.new_empty(n_rows), pre.new_empty(n_rows))


@torch.library.custom_op("recvae_fast::swish_layer_norm_backward", mutates_args=(), device_types="cpu")
def _backward_op(
    grad_y: Tensor, s: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_s, grad_weight, grad_bias, grad_linear_bias): that backward, one op so that its C++ call
    stays out of traced graphs."""
    from .. import _swish_layer_norm

    grad_s = torch.empty_like(s)
    grad_weight, grad_bias, grad_linear_bias = (torch.empty_like(weight) for _ in range(3))
    _swish_layer_norm.backward(
        grad_y.contiguous().numpy(), s.numpy(), mean.numpy(), rstd.numpy(), weight.detach().contiguous().numpy(),
        grad_s.numpy(), grad_weight.numpy(), grad_bias.numpy(), grad_linear_bias.numpy(), torch.get_num_threads(),
    )
    return grad_s, grad_weight, grad_bias, grad_linear_bias


@_backward_op.register_fake
def _(grad_y, s, mean, rstd, weight):
    return torch.empty_like(s), torch.empty_like(weight), torch.empty_like(weight), torch.empty_like(weight)


def _setup(ctx, inputs, output):
    _, s, mean, rstd = output
    ctx.mark_non_differentiable(s, mean, rstd)
    ctx.set_materialize_grads(False)  # else autograd zero-fills a B × H "gradient" for s, never read
    ctx.save_for_backward(s, mean, rstd, inputs[3])
    ctx.kept_s = inputs[6]


def _backward(ctx, grad_y, *_unused):
    s, mean, rstd, weight = ctx.saved_tensors
    if grad_y is None:  # y was not used in the loss
        return None, None, None, None, None, None, None
    if not ctx.kept_s:
        raise RuntimeError("recvae_fast::swish_layer_norm: a gradient is needed but the op ran with keep_s=False")
    grad_s, grad_weight, grad_bias, grad_linear_bias = _backward_op(grad_y, s, mean, rstd, weight)
    need = ctx.needs_input_grad
    return (
        grad_s if need[0] else None, grad_linear_bias if need[1] else None, grad_s if need[2] else None,
        grad_weight if need[3] else None, grad_bias if need[4] else None, None, None,
    )


_swish_layer_norm_op.register_autograd(_backward, setup_context=_setup)
# LayerNorm's statistics in float32: a bf16 product's output (the linear layer before it) is widened.
register_float32_autocast("recvae_fast::swish_layer_norm", ("cpu",))
register_float32_autocast("recvae_fast::swish_layer_norm_backward", ("cpu",))
