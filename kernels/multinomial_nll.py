"""Fused decoder + multinomial log-likelihood of RecVAE as Triton kernels: the op, its autograd and
its entry points.

    multinomial_nll(z, weight, bias, batch)[u] = n_u·LSE_u − Σ_{i∈nz(u)} x_ui·logit_ui
    logit = z·weightᵀ + bias,  n_u = Σ_i x_ui,  LSE_u = log Σ_i exp(logit_ui)

Nothing of size B × I is ever written to memory. The kernels, one per module with its launcher:
- nll_forward: the LSE over all items by item splits (and A_u = Σ_i softmax_ui·Wd[i], from which
  z's gradient is prepared in the forward when z needs one);
- nll_gather: the indexed dot over each user's nonzeros (Σ x·logit, n_u, Σ x·Wd[i]);
- nll_backward: dWd and dbd, one program per item tile, no atomics.
nll_configs holds their tile configurations, the supported K (MAX_K) and the prune rule.

The forward and the backward are ops registered with torch.library.triton_op
(`recvae_fast::triton_multinomial_nll`, `recvae_fast::triton_multinomial_nll_backward`), with the
autograd formula registered on the forward; torch.compile sees the kernels through wrap_triton.
Gradients are computed only when needed: no A unless z requires grad (and grad mode is on), no
backward kernel unless Wd or bd needs a gradient, and inside it only dWd and/or dbd.

Under torch.autocast (bf16-mixed, recvae_fast.precision) the forward op runs on bf16 copies of
z, Wd and bd with fp32 LSE, NLL and gradients (`_nll_autocast`, registered for the autocast keys).

Precision: fp32 inputs follow torch.get_float32_matmul_precision(): "highest" → tl.dot with
input_precision="ieee" (exact fp32 products, FMA units), "high"/"medium" → tf32. bf16/fp16 use
tensor cores with fp32 accumulation, fp32 LSE and fp32 partials; fp64 computes in fp64.
Beyond MAX_K the op raises a ValueError naming it. All products of an index by a stride are done
in int64.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op

from recvae_fast.precision import autocast_product_dtype, register_autocast_kernel

from ._common import SUPPORTED_DTYPES, acc_dtypes, check_batch, check_runs_here, on_device
from .nll_backward import backward_w
from .nll_configs import MAX_K
from .nll_forward import forward_lse
from .nll_gather import gather

__all__ = ["multinomial_nll", "multinomial_nll_parts", "MAX_K"]


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float64:
        return "ieee"
    if dtype == torch.float32:
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return "tf32"  # bf16/fp16: ignored by tl.dot (tensor cores, fp32 accumulation)


def _forward(z, weight, bias, indptr, indices, values, want_a, prec):
    """(lse, total, a, xdot, n, xw) per user, in the accumulation dtype: LSE_u; Σ_i e^{logit_ui − M_u}
    (M_u = LSE_u − log total_u); a_u = Σ_i e^{logit_ui − M_u}·Wd[i] (want_a, else None); Σ x·logit;
    n_u = Σ_i x_ui; Σ_i x_ui·Wd[i] (want_a, else None)."""
    lse, total, a = forward_lse(z, weight, bias, want_a, prec)
    xdot, n, xw = gather(z, weight, bias, indptr, indices, values, want_a)
    return lse, total, a, xdot, n, xw


# ----------------------------------------------------------------------------------------------
# Registered ops (torch.library.triton_op): visible by name to the profiler, checked by opcheck,
# and traceable by torch.compile, which sees the kernels through wrap_triton. The batch is passed
# as its three CSR tensors. Autograd is registered on the forward op; its backward calls the
# backward op only when weight or bias need a gradient.
# ----------------------------------------------------------------------------------------------
@triton_op("recvae_fast::triton_multinomial_nll", mutates_args=())
def multinomial_nll_op(
    z: Tensor, weight: Tensor, bias: Tensor | None, indptr: Tensor, indices: Tensor, values: Tensor,
    want_dz: bool, prec: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(nll [B] in z's dtype; LSE [B], n [B] and dz/g [B, K] ([0, K] unless want_dz) in the
    accumulation dtype). Only nll is differentiable."""
    with on_device(z):
        lse, total, a, xdot, n, xw = _forward(z, weight, bias, indptr, indices, values, want_dz, prec)
    if want_dz:
        # dz_u / g_u = n_u·Σ_i softmax_ui·Wd[i] − Σ_i x_ui·Wd[i]
        dz_per_g = a.mul_((n / total)[:, None]).sub_(xw)
    else:
        dz_per_g = lse.new_empty(0, z.shape[1])
    return (n * lse - xdot).to(z.dtype), lse, n, dz_per_g


@triton_op("recvae_fast::triton_multinomial_nll_parts", mutates_args=())
def multinomial_nll_parts_op(
    z: Tensor, weight: Tensor, bias: Tensor | None, indptr: Tensor, indices: Tensor, values: Tensor,
    want_dz: bool, prec: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(LSE [B], Σ x·logit [B], Σ_i softmax_ui·Wd[i] [B, K], Σ_i x_ui·Wd[i] [B, K]; the last two [0, K]
    unless want_dz), all in the accumulation dtype. The first two are differentiable."""
    with on_device(z):
        lse, total, a, xdot, _, xw = _forward(z, weight, bias, indptr, indices, values, want_dz, prec)
    if want_dz:
        return lse, xdot, a.div_(total[:, None]), xw
    return lse, xdot, lse.new_empty(0, z.shape[1]), lse.new_empty(0, z.shape[1])


@triton_op("recvae_fast::triton_multinomial_nll_backward", mutates_args=())
def multinomial_nll_backward_op(
    z: Tensor, weight: Tensor, bias: Tensor | None, indptr: Tensor, indices: Tensor, values: Tensor,
    lse: Tensor, g_softmax: Tensor, g_x: Tensor, need_w: bool, need_b: bool, prec: str,
) -> tuple[Tensor, Tensor]:
    """(dWd, dbd) for the logits' gradient g_softmax_u·softmax_ui + g_x_u·x_ui (both ops above);
    an empty tensor for a gradient that is not needed."""
    with on_device(z):
        dw, db = backward_w(z, weight, bias, indptr, indices, values, lse, g_softmax, g_x, need_w, need_b, prec)
    return (dw if dw is not None else weight.new_empty(0),
            db if db is not None else weight.new_empty(0))


# Shapes for FakeTensor tracing. triton_op derives them by tracing the body, except under the
# interpreter, where wrap_triton hands back the interpreted kernel, which would run on fake tensors.
@multinomial_nll_op.register_fake
def _(z, weight, bias, indptr, indices, values, want_dz, prec):
    acc_t = acc_dtypes(z.dtype)[0]
    n_users, k = z.shape
    return (z.new_empty(n_users), z.new_empty(n_users, dtype=acc_t), z.new_empty(n_users, dtype=acc_t),
            z.new_empty((n_users if want_dz else 0, k), dtype=acc_t))


@multinomial_nll_parts_op.register_fake
def _(z, weight, bias, indptr, indices, values, want_dz, prec):
    acc_t = acc_dtypes(z.dtype)[0]
    n_users, k = z.shape
    rows = n_users if want_dz else 0
    return (z.new_empty(n_users, dtype=acc_t), z.new_empty(n_users, dtype=acc_t),
            z.new_empty((rows, k), dtype=acc_t), z.new_empty((rows, k), dtype=acc_t))


@multinomial_nll_backward_op.register_fake
def _(z, weight, bias, indptr, indices, values, lse, g_softmax, g_x, need_w, need_b, prec):
    return (torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else weight.new_empty(0),
            weight.new_empty(weight.shape[0]) if need_b else weight.new_empty(0))


def _decoder_grads(ctx, z, weight, bias, indptr, indices, values, lse, g_softmax, g_x):
    need_w, need_b = ctx.needs_input_grad[1:3]
    if not (need_w or need_b):
        return None, None
    grad_w, grad_b = multinomial_nll_backward_op(
        z, weight, bias, indptr, indices, values, lse, g_softmax, g_x, need_w, need_b, ctx.prec)
    return grad_w if need_w else None, grad_b if need_b else None


def _nll_setup_context(ctx, inputs, output):
    z, weight, bias, indptr, indices, values, _, prec = inputs
    _, lse, n, dz_per_g = output
    ctx.mark_non_differentiable(lse, n, dz_per_g)
    # Saved: LSE and n (B floats each) and, only when z needs a gradient, dz/g (B × K).
    ctx.save_for_backward(z, weight, bias, indptr, indices, values, lse, n, dz_per_g)
    ctx.prec = prec


def _nll_backward(ctx, grad_nll, *_unused):
    z, weight, bias, indptr, indices, values, lse, n, dz_per_g = ctx.saved_tensors
    grad_z = None
    if ctx.needs_input_grad[0]:
        if dz_per_g.numel() != z.numel():  # cannot happen through multinomial_nll(); guard anyway
            raise RuntimeError("multinomial_nll: z needs a gradient but the forward ran without grad mode")
        grad_z = (grad_nll.to(dz_per_g.dtype)[:, None] * dz_per_g).to(z.dtype)
    g = grad_nll.to(lse.dtype)
    grad_w, grad_b = _decoder_grads(ctx, z, weight, bias, indptr, indices, values, lse, g * n, -g)
    return (grad_z, grad_w, grad_b) + (None,) * 5


def _parts_setup_context(ctx, inputs, output):
    z, weight, bias, indptr, indices, values, _, prec = inputs
    lse, _, expected_w, xw = output
    ctx.mark_non_differentiable(expected_w, xw)
    ctx.save_for_backward(z, weight, bias, indptr, indices, values, lse, expected_w, xw)
    ctx.prec = prec


def _parts_backward(ctx, grad_lse, grad_x_logit, *_unused):
    z, weight, bias, indptr, indices, values, lse, expected_w, xw = ctx.saved_tensors
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.to(lse.dtype)
    grad_x_logit = torch.zeros_like(lse) if grad_x_logit is None else grad_x_logit.to(lse.dtype)
    grad_z = None
    if ctx.needs_input_grad[0]:
        if expected_w.numel() != z.numel():  # cannot happen through multinomial_nll_parts(); guard anyway
            raise RuntimeError("multinomial_nll_parts: z needs a gradient but the forward ran without grad mode")
        # dLSE_u/dz_u = Σ_i softmax_ui·Wd[i]; d(Σ x·logit)_u/dz_u = Σ_i x_ui·Wd[i]
        grad_z = (grad_lse[:, None] * expected_w + grad_x_logit[:, None] * xw).to(z.dtype)
    grad_w, grad_b = _decoder_grads(ctx, z, weight, bias, indptr, indices, values, lse, grad_lse, grad_x_logit)
    return (grad_z, grad_w, grad_b) + (None,) * 5


multinomial_nll_op.register_autograd(_nll_backward, setup_context=_nll_setup_context)
multinomial_nll_parts_op.register_autograd(_parts_backward, setup_context=_parts_setup_context)


def _nll_autocast(device_type, z, weight, bias, indptr, indices, values, want_dz, prec):
    """recvae_fast::triton_multinomial_nll under autocast (bf16-mixed): the kernels run on bf16
    copies of z, Wd and bd (tensor cores, fp32 accumulation), through the parts op, whose LSE and
    Σ x·logit come back in fp32, so the NLL n·LSE − Σ x·logit is formed in fp32; the casts are
    differentiable, so z, Wd and bd get fp32 gradients. float64 inputs run as they are."""
    dtype = autocast_product_dtype(device_type)
    tensors = (z, weight) + ((bias,) if bias is not None else ())
    if dtype is None or any(t.dtype == torch.float64 for t in tensors):
        return multinomial_nll_op(z, weight, bias, indptr, indices, values, want_dz, prec)
    low_bias = bias.to(dtype) if bias is not None else None
    lse, x_logit, _, _ = multinomial_nll_parts_op(z.to(dtype), weight.to(dtype), low_bias, indptr, indices, values,
                                                  want_dz, _dot_precision(dtype))
    rows = torch.repeat_interleave(torch.arange(z.shape[0], device=z.device), indptr[1:] - indptr[:-1],
                                   output_size=indices.shape[0])
    n = torch.zeros_like(lse).index_add_(0, rows, values.to(lse.dtype))
    return n * lse - x_logit, lse.detach(), n, lse.new_empty(0, z.shape[1])


register_autocast_kernel("recvae_fast::triton_multinomial_nll", _nll_autocast)


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------
def _validate(z, weight, bias, batch) -> None:
    for name, t in (("z", z), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if z.dim() != 2:
        raise ValueError(f"z must be 2-D [B, K], got shape {tuple(z.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [I, K], got shape {tuple(weight.shape)}")
    n_users, k = z.shape
    n_items = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"weight has K={weight.shape[1]} columns, z has K={k}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n_items):
        raise ValueError(f"bias must have shape [{n_items}], got {tuple(bias.shape)}")
    check_batch(batch, n_users, n_items, z.device, "multinomial_nll")
    if z.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"z has dtype {z.dtype}; supported: float16, bfloat16, float32, float64")
    if n_items == 0 or not 1 <= k <= MAX_K[z.dtype]:
        raise ValueError(f"multinomial_nll needs at least one item and 1 <= K <= {MAX_K[z.dtype]} for {z.dtype} "
                         f"(MAX_K: the dz and dWd accumulators stay in registers), got I={n_items}, K={k}")
    if weight.dtype != z.dtype or (bias is not None and bias.dtype != z.dtype):
        raise TypeError(
            f"z, weight and bias must share a dtype, got {z.dtype}, {weight.dtype}, "
            f"{bias.dtype if bias is not None else None}"
        )
    devices = {z.device, weight.device} | ({bias.device} if bias is not None else set())
    if len(devices) != 1:
        raise ValueError(f"z, weight, bias and the batch must be on one device, got {sorted(map(str, devices))}")
    check_runs_here(z.device, "multinomial_nll", "recvae_fast.ops.multinomial_nll with impl \"cpp\" or \"torch\"")


def multinomial_nll(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, batch) -> torch.Tensor:
    """−mll per user, shape [B], dtype of z; differentiable in z, weight and bias, and only the
    gradients that are needed are computed (z's is prepared in the forward pass, see above)."""
    _validate(z, weight, bias, batch)
    if z.shape[0] == 0:
        return (z.sum(dim=1) + weight.sum() * 0 + (bias.sum() * 0 if bias is not None else 0))[:0]
    want_dz = torch.is_grad_enabled() and z.requires_grad
    return multinomial_nll_op(
        z.contiguous(), weight.contiguous(), bias.contiguous() if bias is not None else None,
        batch.indptr, batch.indices, batch.values, want_dz, _dot_precision(z.dtype),
    )[0]


def multinomial_nll_parts(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, batch):
    """(LSE_u = log Σ_i exp(logit_ui), Σ_{i∈nz(u)} x_ui·logit_ui), both [B] in z's dtype, so that
    multinomial_nll = n_u·LSE_u − Σ x·logit. The same kernels as multinomial_nll, for item shards
    that combine their parts (the LSEs by a log-sum-exp, the sums by a sum); differentiable in z,
    weight and bias (dlogit_ui = g_lse_u·softmax_ui + g_x_u·x_ui). A user with no items has LSE over
    all items and a sum of 0; with no items at all (I = 0) the op refuses, as multinomial_nll does."""
    _validate(z, weight, bias, batch)
    if z.shape[0] == 0:
        empty = (z.sum(dim=1) + weight.sum() * 0 + (bias.sum() * 0 if bias is not None else 0))[:0]
        return empty, empty.clone()
    want_dz = torch.is_grad_enabled() and z.requires_grad
    lse, x_logit, _, _ = multinomial_nll_parts_op(
        z.contiguous(), weight.contiguous(), bias.contiguous() if bias is not None else None,
        batch.indptr, batch.indices, batch.values, want_dz, _dot_precision(z.dtype),
    )
    return lse.to(z.dtype), x_logit.to(z.dtype)
