"""The fused ops registered with PyTorch (torch.library) under the namespace ``recvae_fast::``.

Registered ops are visible by name to the profiler, checked by `torch.library.opcheck`, and
opaque to torch.compile (Dynamo and Inductor call them; their fake implementations give the
output shapes), so the loss traces with fullgraph=True. They take tensors, never a CSRBatch:
a batch is passed as (indptr, indices, values).

    recvae_fast::sparse_input_layer(indptr, indices, coef, weight_t, bias, sparse_grad) -> h1_pre
        bias + Σ_{i∈nz(u)} coef_ui·weight_t[i]; differentiable in coef, weight_t and bias
        (sparse_grad=True: weight_t's gradient is a sparse COO tensor of the batch's rows).
    recvae_fast::multinomial_nll(z, weight, bias, indptr, indices, values, item_block,
                                 want_grad_z, keep_probs, product_dtype)
                                 -> (nll, lse, dz_per_g, kept, kept_max, block_used)
        −mll per user over cache-sized item blocks (recvae_fast.torch_ops.nll_forward; item_block 0:
        the machine's rule, decided when the op runs); only nll is differentiable (in z, weight,
        bias), the rest is what its backward needs. product_dtype (None, or bf16 under autocast):
        the dtype of the products' operands; everything else stays in the inputs' dtype.
    recvae_fast::multinomial_nll_decoder_backward(...) -> (grad_weight, grad_bias)
        that backward's decoder part, one op so that its block loop stays out of traced graphs.
    recvae_fast::csr_row_sums(indptr, cols, weights, table, recycle_key, num_threads) -> out
        out[r] = Σ weights·table[cols] over CSR row r (the C++ csrc/sparse_rows.cpp): fc1's weight
        gradient on the CPU; no autograd.
    recvae_fast::csr_transpose(indptr, cols, weights, n_cols) -> (col_ptr, rows, weights)
        the CSR matrix's transpose by a counting sort (csrc/sparse_rows.cpp): the batch grouped by
        item for fc1's dense weight gradient on the CPU; no autograd.
    recvae_fast::topk_masked(scores, indptr, indices, k, num_threads) -> (scores, items)
        the C++ masked top-k (recvae_fast.topk); no autograd.
    recvae_fast::row_sparse_adam_step(param!, exp_avg!, exp_avg_sq!, rows, grad_values, step, lr,
                                      beta1, beta2, eps, num_threads) -> ()
        the C++ row-sparse Adam step (recvae_fast.optim), in place; no autograd.
    recvae_fast::swish_layer_norm(pre, linear_bias?, residual?, weight, bias, eps, keep_s)
                                  -> (y, s, mean, rstd)
        y = LayerNorm(swish(pre + linear_bias + residual)) in one pass per row (the C++
        csrc/swish_layer_norm.cpp): the encoder's layer tail on the CPU; differentiable in pre,
        linear_bias, residual, weight and bias when keep_s kept s (what backward needs).
    recvae_fast::swish_layer_norm_backward(grad_y, s, mean, rstd, weight)
        -> (grad_s, grad_weight, grad_bias, grad_linear_bias): its backward, one op.
    recvae_fast::composite_prior_kl(mu, logvar, eps, prior_mean, prior_logvar, old_mu, old_logvar,
                                    uniform_logvar, log_weights, keep_slope) -> (kl, slope, dz)
        the composite prior's KL term per user in one pass per row (the C++
        csrc/composite_prior_kl.cpp), and with keep_slope the slope and dz its written-out
        gradients need (recvae_fast.model._KLPerUser); no autograd of its own.

Under torch.autocast (recvae_fast.precision): multinomial_nll runs its products with the autocast
dtype's operands (product_dtype) on float32 inputs; every other op widens bf16/fp16 inputs to
float32 and computes in float32 (LayerNorm statistics, KL, row sums, top-k state), as declared
with recvae_fast.precision.register_autocast_kernel, which torch.compile and torch.export follow.

These are the "torch" and "cpp" implementations (recvae_fast.ops). The Triton implementations are
registered with torch.library.triton_op in their own files in kernels/ (recvae_fast::triton_*).

torch.compile: RecVAE's training loss compiles with fullgraph=True (Inductor, CPU) and gives the
eager loss and gradients (tests/test_custom_ops.py) with the dense fc1 gradient. With the
row-sparse one (sparse_grad=True) Inductor's backward fails ("Cannot access storage of
SparseTensorImpl", torch 2.13: Inductor does not take sparse tensors); that path runs eager.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .precision import autocast_product_dtype, register_autocast_kernel, register_float32_autocast, widen_low
from .torch_ops import kept_max_rows, nll_decoder_grads, nll_forward
from .workspace import recycled_empty

# ----------------------------------------------------------------------------- sparse input layer


def _row_ids(indptr: Tensor, nnz: int) -> Tensor:
    rows = torch.arange(indptr.numel() - 1, device=indptr.device)
    return torch.repeat_interleave(rows, indptr[1:] - indptr[:-1], output_size=nnz)


@torch.library.custom_op("recvae_fast::sparse_input_layer", mutates_args=())
def sparse_input_layer(
    indptr: Tensor, indices: Tensor, coef: Tensor, weight_t: Tensor, bias: Tensor, sparse_grad: bool
) -> Tensor:
    h = F.embedding_bag(indices, weight_t, indptr, mode="sum", per_sample_weights=coef, include_last_offset=True)
    return h + bias


@sparse_input_layer.register_fake
def _(indptr, indices, coef, weight_t, bias, sparse_grad):
    return weight_t.new_empty(indptr.shape[0] - 1, weight_t.shape[1])


def _sparse_input_layer_setup(ctx, inputs, output):
    indptr, indices, coef, weight_t, _, sparse_grad = inputs
    ctx.save_for_backward(indptr, indices, coef, weight_t)
    ctx.sparse_grad = sparse_grad


def _sparse_input_layer_backward(ctx, grad):
    indptr, indices, coef, weight_t = ctx.saved_tensors
    need_coef, need_weight, need_bias = ctx.needs_input_grad[2:5]
    grad_coef = grad_weight = grad_bias = None
    if need_coef:
        grad_coef = (grad[_row_ids(indptr, indices.numel())] * weight_t[indices]).sum(dim=1)
    if need_weight and not ctx.sparse_grad and _cpp_rows(grad):
        # dW[i] = Σ_{n: item i} coef_n·grad[row_n]: the same bag, transposed (nonzeros grouped by
        # item, by the C++ counting sort), so each row of dW is one weighted sum of grad rows.
        item_ptr, users, item_coef = csr_transpose(indptr, indices, coef.detach(), weight_t.shape[0])
        grad_weight = _rows_of_weight_grad(item_ptr, users, item_coef, grad, False)
    elif need_weight:
        # The same with torch's sort; row-sparse: only the batch's items get a row.
        rows = _row_ids(indptr, indices.numel())
        order = torch.argsort(indices, stable=True)
        items_sorted = indices[order]
        if ctx.sparse_grad:  # the batch's items only, one row each (a coalesced COO tensor)
            items, counts = torch.unique_consecutive(items_sorted, return_counts=True)
        else:
            items, counts = None, torch.bincount(items_sorted, minlength=weight_t.shape[0])
        offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        sums = _rows_of_weight_grad(offsets, rows[order], coef[order], grad, ctx.sparse_grad)
        if ctx.sparse_grad:
            grad_weight = torch.sparse_coo_tensor(items[None], sums, weight_t.shape, is_coalesced=True,
                                                  check_invariants=False)
        else:
            grad_weight = sums
    if need_bias:
        grad_bias = grad.sum(dim=0)
    return None, None, grad_coef, grad_weight, grad_bias, None


def _cpp_rows(t: Tensor) -> bool:
    """Whether csrc/sparse_rows.cpp's functions take t (CPU, float32/float64)."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def _rows_of_weight_grad(offsets: Tensor, users: Tensor, coef: Tensor, grad: Tensor, row_sparse: bool) -> Tensor:
    """dW1's rows, one per bag (item): Σ coef·grad[user] over the bag's nonzeros. On the CPU the
    C++ CSR row sums (recvae_fast::csr_row_sums: embedding_bag's per-bag cost dominates at ~2
    nonzeros per bag), in recycled memory; elsewhere embedding_bag."""
    if not _cpp_rows(grad):
        return F.embedding_bag(users, grad, offsets, mode="sum", per_sample_weights=coef, include_last_offset=True)
    key = "sparse_input_layer.grad_rows" if row_sparse else "sparse_input_layer.grad_weight"
    return csr_row_sums(offsets, users, coef.detach(), grad.detach().contiguous(), key, max(1, torch.get_num_threads()))


sparse_input_layer.register_autograd(_sparse_input_layer_backward, setup_context=_sparse_input_layer_setup)

# ----------------------------------------------------------------------------- multinomial NLL


@torch.library.custom_op("recvae_fast::multinomial_nll", mutates_args=())
def multinomial_nll(
    z: Tensor, weight: Tensor, bias: Tensor, indptr: Tensor, indices: Tensor, values: Tensor,
    item_block: int, want_grad_z: bool, keep_probs: bool, product_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return nll_forward(z, weight, bias, indptr, indices, values, item_block, want_grad_z, keep_probs, product_dtype)


@multinomial_nll.register_fake
def _(z, weight, bias, indptr, indices, values, item_block, want_grad_z, keep_probs, product_dtype=None):
    n_users, n_items = z.shape[0], weight.shape[0]
    return (
        z.new_empty(n_users),
        z.new_empty(n_users),
        z.new_empty(z.shape if want_grad_z else (0,)),
        z.new_empty(n_users * n_items if keep_probs else 0),
        z.new_empty((kept_max_rows(n_items, item_block), n_users) if keep_probs else (0,)),
        torch.empty(1, dtype=torch.int64, device="cpu"),
    )


@torch.library.custom_op("recvae_fast::multinomial_nll_decoder_backward", mutates_args=())
def multinomial_nll_decoder_backward(
    grad_nll: Tensor, z: Tensor, weight: Tensor, bias: Tensor, indptr: Tensor, indices: Tensor, values: Tensor,
    lse: Tensor, kept: Tensor, kept_max: Tensor, block_used: Tensor, product_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    return nll_decoder_grads(grad_nll, z, weight, bias, indptr, indices, values, lse, kept, kept_max, block_used,
                             product_dtype)


@multinomial_nll_decoder_backward.register_fake
def _(grad_nll, z, weight, bias, indptr, indices, values, lse, kept, kept_max, block_used, product_dtype=None):
    return torch.empty_like(weight), torch.empty_like(bias)


def _multinomial_nll_setup(ctx, inputs, output):
    z, weight, bias, indptr, indices, values = inputs[:6]
    _, lse, dz_per_g, kept, kept_max, block_used = output
    ctx.mark_non_differentiable(lse, dz_per_g, kept, kept_max, block_used)
    ctx.set_materialize_grads(False)  # else autograd zero-fills a B × I "gradient" for kept, never read
    ctx.save_for_backward(z, weight, bias, indptr, indices, values, lse, dz_per_g, kept, kept_max, block_used)
    ctx.product_dtype = inputs[9] if len(inputs) > 9 else None


def _multinomial_nll_backward(ctx, grad_nll, *_unused):
    z, weight, bias, indptr, indices, values, lse, dz_per_g, kept, kept_max, block_used = ctx.saved_tensors
    need_z, need_weight, need_bias = ctx.needs_input_grad[:3]
    grad_z = grad_weight = grad_bias = None
    if grad_nll is None:  # nll was not used in the loss (grads are not materialised)
        return (None,) * 10
    if need_z:
        if dz_per_g.numel() != z.numel():
            raise RuntimeError("recvae_fast::multinomial_nll: z needs a gradient but ran with want_grad_z=False")
        grad_z = grad_nll[:, None] * dz_per_g
    if need_weight or need_bias:
        grad_weight, grad_bias = multinomial_nll_decoder_backward(
            grad_nll, z, weight, bias, indptr, indices, values, lse, kept, kept_max, block_used, ctx.product_dtype
        )
    return (
        grad_z, grad_weight if need_weight else None, grad_bias if need_bias else None,
        None, None, None, None, None, None, None,
    )


multinomial_nll.register_autograd(_multinomial_nll_backward, setup_context=_multinomial_nll_setup)


def _multinomial_nll_autocast(device_type, z, weight, bias, indptr, indices, values, item_block, want_grad_z,
                              keep_probs, product_dtype=None):
    """Under autocast: bf16/fp16 inputs widened to float32, and the products' operands in the
    autocast dtype (LSE, softmax and the gradients' sums stay float32). float64 stays float64,
    products included: autocast leaves float64 alone."""
    z, weight, bias, values = widen_low((z, weight, bias, values))
    if product_dtype is None and z.dtype == torch.float32:
        product_dtype = autocast_product_dtype(device_type)
    return multinomial_nll(z, weight, bias, indptr, indices, values, item_block, want_grad_z, keep_probs,
                           product_dtype)


register_autocast_kernel("recvae_fast::multinomial_nll", _multinomial_nll_autocast)
register_float32_autocast("recvae_fast::multinomial_nll_decoder_backward")
register_float32_autocast("recvae_fast::sparse_input_layer")

# ----------------------------------------------------------------------------- C++ ops


@torch.library.custom_op("recvae_fast::csr_row_sums", mutates_args=(), device_types="cpu")
def csr_row_sums(indptr: Tensor, cols: Tensor, weights: Tensor, table: Tensor, recycle_key: str, num_threads: int) -> Tensor:
    """out[r] = Σ_{n ∈ row r} weights[n]·table[cols[n]] (csrc/sparse_rows.cpp), float32/float64; the
    output's memory is recycled under recycle_key (recvae_fast.workspace)."""
    from . import _sparse_rows  # loaded on first use, not when the package is imported

    out = recycled_empty(recycle_key, (indptr.numel() - 1, table.shape[1]), table.dtype)
    _sparse_rows.weighted_row_sums(indptr.numpy(), cols.numpy(), weights.contiguous().numpy(),
                                   table.contiguous().numpy(), out.numpy(), num_threads)
    return out


@csr_row_sums.register_fake
def _(indptr, cols, weights, table, recycle_key, num_threads):
    return table.new_empty(indptr.shape[0] - 1, table.shape[1])


@torch.library.custom_op("recvae_fast::csr_transpose", mutates_args=(), device_types="cpu")
def csr_transpose(indptr: Tensor, cols: Tensor, weights: Tensor, n_cols: int) -> tuple[Tensor, Tensor, Tensor]:
    """(col_ptr [n_cols + 1], rows [nnz], weights [nnz]) of the CSR matrix's transpose, each column's
    entries in row order (csrc/sparse_rows.cpp's counting sort), float32/float64 weights."""
    from . import _sparse_rows

    col_ptr = torch.empty(n_cols + 1, dtype=torch.int64)
    rows, weights_t = torch.empty_like(cols), torch.empty_like(weights)
    _sparse_rows.csr_transpose(indptr.contiguous().numpy(), cols.contiguous().numpy(),
                               weights.detach().contiguous().numpy(), col_ptr.numpy(), rows.numpy(), weights_t.numpy())
    return col_ptr, rows, weights_t


@csr_transpose.register_fake
def _(indptr, cols, weights, n_cols):
    return cols.new_empty(n_cols + 1), torch.empty_like(cols), torch.empty_like(weights)


@torch.library.custom_op("recvae_fast::topk_masked", mutates_args=(), device_types="cpu")
def topk_masked(scores: Tensor, indptr: Tensor, indices: Tensor, k: int, num_threads: int) -> tuple[Tensor, Tensor]:
    from .topk import topk_masked_cpp

    return tuple(topk_masked_cpp(scores, indptr.numpy(), indices.numpy(), k, num_threads))


@topk_masked.register_fake
def _(scores, indptr, indices, k, num_threads):
    n_rows = scores.shape[0]
    return scores.new_empty(n_rows, k), scores.new_empty(n_rows, k, dtype=torch.int64)


@torch.library.custom_op(
    "recvae_fast::row_sparse_adam_step", mutates_args=("param", "exp_avg", "exp_avg_sq"), device_types="cpu"
)
def row_sparse_adam_step(
    param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, rows: Tensor, grad_values: Tensor,
    step: int, lr: float, beta1: float, beta2: float, eps: float, num_threads: int,
) -> None:
    from . import _row_sparse_adam  # loaded on first use, not when the package is imported

    for name, t in (("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not t.is_contiguous():
            raise ValueError(f"recvae_fast::row_sparse_adam_step: {name} must be contiguous")
    _row_sparse_adam.adam_step_row_sparse(
        param.detach().numpy(), exp_avg.detach().numpy(), exp_avg_sq.detach().numpy(),
        rows.numpy(), grad_values.detach().contiguous().numpy(),  # repeated rows: the C++ sums them
        lr, beta1, beta2, eps, step, num_threads,
    )


@row_sparse_adam_step.register_fake
def _(param, exp_avg, exp_avg_sq, rows, grad_values, step, lr, beta1, beta2, eps, num_threads):
    return None


@torch.library.custom_op("recvae_fast::swish_layer_norm", mutates_args=(), device_types="cpu")
def swish_layer_norm(
    pre: Tensor, linear_bias: Tensor | None, residual: Tensor | None, weight: Tensor, bias: Tensor, eps: float,
    keep_s: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from . import _swish_layer_norm  # loaded on first use, not when the package is imported

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


def _array_or_none(t: Tensor | None):
    return None if t is None else t.detach().contiguous().numpy()


@swish_layer_norm.register_fake
def _(pre, linear_bias, residual, weight, bias, eps, keep_s):
    n_rows, width = pre.shape
    return (pre.new_empty(n_rows, width), pre.new_empty((n_rows, width) if keep_s else (0,)),
            pre.new_empty(n_rows), pre.new_empty(n_rows))


def _swish_layer_norm_setup(ctx, inputs, output):
    _, s, mean, rstd = output
    ctx.mark_non_differentiable(s, mean, rstd)
    ctx.set_materialize_grads(False)  # else autograd zero-fills a B × H "gradient" for s, never read
    ctx.save_for_backward(s, mean, rstd, inputs[3])
    ctx.kept_s = inputs[6]


@torch.library.custom_op("recvae_fast::swish_layer_norm_backward", mutates_args=(), device_types="cpu")
def swish_layer_norm_backward(
    grad_y: Tensor, s: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_s, grad_weight, grad_bias, grad_linear_bias): that backward, one op so that its C++ call
    stays out of traced graphs."""
    from . import _swish_layer_norm

    grad_s = torch.empty_like(s)
    grad_weight, grad_bias, grad_linear_bias = (torch.empty_like(weight) for _ in range(3))
    _swish_layer_norm.backward(
        grad_y.contiguous().numpy(), s.numpy(), mean.numpy(), rstd.numpy(), weight.detach().contiguous().numpy(),
        grad_s.numpy(), grad_weight.numpy(), grad_bias.numpy(), grad_linear_bias.numpy(), torch.get_num_threads(),
    )
    return grad_s, grad_weight, grad_bias, grad_linear_bias


@swish_layer_norm_backward.register_fake
def _(grad_y, s, mean, rstd, weight):
    return torch.empty_like(s), torch.empty_like(weight), torch.empty_like(weight), torch.empty_like(weight)


def _swish_layer_norm_backward(ctx, grad_y, *_unused):
    s, mean, rstd, weight = ctx.saved_tensors
    if grad_y is None:  # y was not used in the loss
        return None, None, None, None, None, None, None
    if not ctx.kept_s:
        raise RuntimeError("recvae_fast::swish_layer_norm: a gradient is needed but the op ran with keep_s=False")
    grad_s, grad_weight, grad_bias, grad_linear_bias = swish_layer_norm_backward(grad_y, s, mean, rstd, weight)
    need = ctx.needs_input_grad
    return (
        grad_s if need[0] else None, grad_linear_bias if need[1] else None, grad_s if need[2] else None,
        grad_weight if need[3] else None, grad_bias if need[4] else None, None, None,
    )


swish_layer_norm.register_autograd(_swish_layer_norm_backward, setup_context=_swish_layer_norm_setup)
# LayerNorm's statistics in float32: a bf16 product's output (the linear layer before it) is widened.
register_float32_autocast("recvae_fast::swish_layer_norm", ("cpu",))
register_float32_autocast("recvae_fast::swish_layer_norm_backward", ("cpu",))


@torch.library.custom_op("recvae_fast::composite_prior_kl", mutates_args=(), device_types="cpu")
def composite_prior_kl(
    mu: Tensor, logvar: Tensor, eps: Tensor, prior_mean: Tensor, prior_logvar: Tensor, old_mu: Tensor,
    old_logvar: Tensor, uniform_logvar: Tensor, log_weights: list[float], keep_slope: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from . import _composite_prior_kl  # loaded on first use, not when the package is imported

    n_rows, latent = mu.shape
    kl = mu.new_empty(n_rows)
    kept = (n_rows, latent) if keep_slope else (0,)
    slope, dz = mu.new_empty(kept), mu.new_empty(kept)  # two tensors: outputs must not alias

    def array(t: Tensor, flat: bool = False):
        t = t.detach()
        return (t.reshape(-1) if flat else t).contiguous().numpy()

    _composite_prior_kl.composite_prior_kl(
        array(mu), array(logvar), array(eps), array(prior_mean, True), array(prior_logvar, True), array(old_mu),
        array(old_logvar), array(uniform_logvar, True), log_weights, kl.numpy(),
        slope.numpy() if keep_slope else None, dz.numpy() if keep_slope else None, torch.get_num_threads(),
    )
    return kl, slope, dz


@composite_prior_kl.register_fake
def _(mu, logvar, eps, prior_mean, prior_logvar, old_mu, old_logvar, uniform_logvar, log_weights, keep_slope):
    kept = mu.shape if keep_slope else (0,)
    return mu.new_empty(mu.shape[0]), mu.new_empty(kept), mu.new_empty(kept)


register_float32_autocast("recvae_fast::composite_prior_kl", ("cpu",))
register_float32_autocast("recvae_fast::csr_row_sums", ("cpu",))
