"""`ShardedRecVAE`: RecVAE with fc1, the old encoder's fc1 and the decoder split by item rows.

Rank r of the item group holds rows [lo_r, hi_r) of fc1 (stored I × H, as recvae_fast.model),
of the old encoder's fc1 and of the decoder (weight rows and bias); every other parameter is
replicated. Every rank sees the whole CSR batch:
- fc1: c_ui (row L2 norm, dropout mask) from the full row, as on one device; each rank gathers its
  own items' rows into a partial B × H sum; one all-reduce gives h1_pre.
- likelihood: each rank's log-sum-exp over its items and its Σ x·logit (`shard_likelihood_parts`,
  streamed in item chunks); an all-gather of the B-sized LSEs gives the global one, an all-reduce the sum.
  dz is all-reduced (B × K) in backward; decoder and fc1 gradients stay on their rank.
Both per-shard ops follow recvae_fast.ops.dispatch's rule (`impl`): "torch" and "cpp" run the
registered fc1 op (its weight gradient in torch ops or C++) and `shard_likelihood_parts` below
(torch ops: the parts have no C++ code), "triton" the kernels (fc1's on the shard's slice, and the
NLL kernels' `multinomial_nll_parts`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..cache_blocks import item_block_size
from ..model import CompositePrior, Encoder, RecVAE, check_given_posterior
from ..ops.dispatch import compute_dtype, import_kernel, resolve_impl
from ..ops.sparse_input_layer import input_coefficients, weighted_row_gather
from ..sparse import CSRBatch, as_csr_batch
from .mesh import ItemLayout, gather_over_shards, grad_summed_over_shards, sum_over_shards

# Rows per block of the layout-independent initialisation (see ShardedRecVAE.reset_item_parameters).
INIT_BLOCK_ROWS = 4096
# Numbers per block of the one-device initialisation's streamed draws (see draw_rows_like_one_device).
STREAM_BLOCK_NUMBERS = 1 << 20
# "one-device": the weights RecVAE(hidden, latent, n_items) takes from torch's generator, drawn the same
# way (slow at huge catalogues: every rank draws all I × (2·H + K + 1) numbers); "blocked": drawn in blocks
# of INIT_BLOCK_ROWS rows from generators seeded per block, the same for any layout but not RecVAE's.
INITS = ("one-device", "blocked")


@torch.no_grad()
def draw_rows_like_one_device(rows: torch.Tensor, n_rows: int, lo: int, draw) -> None:
    """Fill `rows`, rows [lo, lo + len(rows)) of an n_rows-row tensor, with what `draw` (an in-place
    initialiser, e.g. nn.init.uniform_) gives when applied to the whole tensor from torch's generator.

    torch's CPU generator fills a tensor element after element, so drawing the whole tensor in blocks of
    rows, in order, gives its numbers block by block; each rank keeps its rows and drops the others,
    and torch's generator ends where one draw over the whole tensor leaves it. Memory: one block."""
    shape = tuple(rows.shape[1:])
    width = math.prod(shape) or 1
    block_rows = max(1, STREAM_BLOCK_NUMBERS // width)
    hi = lo + rows.shape[0]
    for start in range(0, n_rows, block_rows):
        stop = min(start + block_rows, n_rows)
        block = draw(torch.empty((stop - start,) + shape, dtype=rows.dtype))
        keep_lo, keep_hi = max(start, lo), min(stop, hi)
        if keep_lo < keep_hi:
            rows[keep_lo - lo : keep_hi - lo] = block[keep_lo - start : keep_hi - start]


class ShardView:
    """A full canonical batch and its nonzeros that fall in this rank's shard (item ids local)."""

    def __init__(self, batch: CSRBatch, lo: int, hi: int):
        self.full = batch
        self.selected = (batch.indices >= lo) & (batch.indices < hi)
        rows = batch.row_ids()[self.selected]
        indptr = torch.zeros(batch.n_rows + 1, dtype=torch.int64, device=batch.device)
        indptr[1:] = torch.cumsum(torch.bincount(rows, minlength=batch.n_rows), 0)
        self.local = CSRBatch(indptr, batch.indices[self.selected] - lo, batch.values[self.selected], hi - lo)


class _ShardLikelihoodParts(torch.autograd.Function):
    """This shard's two parts of each user's likelihood: LSE_u = log Σ_{i in shard} exp(logit_ui) and
    Σ_{i in nz(u), in shard} x_ui·logit_ui, logits = z·Wdᵀ + bd over the shard's rows.

    Forward streams item chunks (online max and sum) and saves the B LSEs, not the logits; backward
    recomputes each chunk's softmax, with the sparse −g·x part put into the chunk before its products
    (so dWd and dbd take one product and one sum per chunk, and no dense I × K gradient of the sparse
    part is ever built). When only z needs a gradient (an encoder step), forward also accumulates
    E_softmax[Wd]_u = Σ_i softmax_ui·Wd[i], and backward is dz = g_lse·E[Wd] + g_x·Σ_i x_ui·Wd[i] with
    no second pass. (The per-shard partial of recvae_fast.ops.multinomial_nll's torch block loop; impl
    "triton" runs the kernels' multinomial_nll_parts instead.)"""

    @staticmethod
    def forward(ctx, z, weight, bias, local: CSRBatch, chunk: int, only_grad_z: bool):
        run_max = torch.full((z.shape[0],), float("-inf"), dtype=z.dtype, device=z.device)
        run_sum = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        expected_w = torch.zeros_like(z) if only_grad_z else None
        for start in range(0, weight.shape[0], chunk):
            w_chunk = weight[start : start + chunk]
            logits = torch.addmm(bias[start : start + chunk], z, w_chunk.t())
            new_max = torch.maximum(run_max, logits.amax(dim=1))
            rescale = torch.exp(run_max - new_max)  # exp(-inf) = 0 on the first chunk
            probs = torch.exp(logits.sub_(new_max[:, None]))
            run_sum = run_sum * rescale + probs.sum(dim=1)
            if only_grad_z:
                expected_w.mul_(rescale[:, None]).addmm_(probs, w_chunk)
            run_max = new_max
        lse = run_max + torch.log(run_sum)
        # Σ_i x_ui·logit_ui = z_u·(Σ_i x_ui·Wd[i]) + Σ_i x_ui·bd[i]: one bag over the nonzeros
        x_weight = F.embedding_bag(
            local.indices, weight, local.indptr, mode="sum", per_sample_weights=local.values, include_last_offset=True
        )
        x_bias = torch.zeros_like(lse).index_add_(0, local.row_ids(), local.values * bias[local.indices])
        x_logit = (z * x_weight).sum(dim=1) + x_bias
        if only_grad_z:
            ctx.save_for_backward(expected_w.div_(run_sum[:, None]), x_weight)
        else:
            ctx.save_for_backward(z, weight, bias, lse)
            ctx.local = local
        ctx.chunk, ctx.only_grad_z = chunk, only_grad_z
        return lse, x_logit

    @staticmethod
    def backward(ctx, grad_lse, grad_x_logit):
        if ctx.only_grad_z:
            expected_w, x_weight = ctx.saved_tensors
            return grad_lse[:, None] * expected_w + grad_x_logit[:, None] * x_weight, None, None, None, None, None
        z, weight, bias, lse = ctx.saved_tensors
        local, chunk = ctx.local, ctx.chunk
        need_z, need_w, need_b = ctx.needs_input_grad[:3]
        grad_z = torch.zeros_like(z) if need_z else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty_like(bias) if need_b else None
        # G = g_lse·softmax + g_x·x, chunk by chunk; nonzeros sorted by item give each chunk a slice
        order = torch.argsort(local.indices, stable=True)
        items_sorted = local.indices[order]
        rows_sorted = local.row_ids()[order]
        gx_sorted = (grad_x_logit[local.row_ids()] * local.values)[order]
        n_items = weight.shape[0]
        chunk_starts = torch.arange(0, n_items + chunk, chunk, device=z.device).clamp_(max=n_items)
        bounds = torch.searchsorted(items_sorted, chunk_starts).tolist()
        for k, start in enumerate(range(0, n_items, chunk)):
            w_chunk = weight[start : start + chunk]
            logits = torch.addmm(bias[start : start + chunk], z, w_chunk.t())
            g = torch.exp(logits.sub_(lse[:, None])).mul_(grad_lse[:, None])
            lo, hi = bounds[k], bounds[k + 1]
            flat = rows_sorted[lo:hi] * g.shape[1] + (items_sorted[lo:hi] - start)
            g.view(-1).index_add_(0, flat, gx_sorted[lo:hi])
            if need_z:
                grad_z.addmm_(g, w_chunk)
            if need_w:
                torch.mm(g.t(), z, out=grad_w[start : start + chunk])
            if need_b:
                torch.sum(g, dim=0, out=grad_b[start : start + chunk])
        return grad_z, grad_w, grad_b, None, None, None


def shard_likelihood_parts(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, local: CSRBatch):
    """(LSE over the shard's items, Σ x·logit over the shard's nonzeros) per user, both [B]."""
    chunk = item_block_size(z.shape[0], z.element_size())
    only_grad_z = torch.is_grad_enabled() and z.requires_grad and not (weight.requires_grad or bias.requires_grad)
    return _ShardLikelihoodParts.apply(z, weight, bias, local, chunk, only_grad_z)


def sharded_multinomial_nll(z, weight, bias, view: ShardView, layout: ItemLayout, impl: str | None = None) -> torch.Tensor:
    """−mll per user, [B]: n_u·LSE_u − Σ_i x_ui·logit_ui, with this rank holding decoder rows [lo, hi).
    impl: the multinomial_nll implementation for the shard's parts (recvae_fast.ops.dispatch's rule;
    "cpp" runs the torch parts, which have no C++ code)."""
    z_here = grad_summed_over_shards(z, layout)  # dz = Σ over shards of each shard's part
    if resolve_impl("multinomial_nll", impl, z.device) == "triton":
        parts = import_kernel("multinomial_nll", "multinomial_nll_parts")
    else:
        parts = shard_likelihood_parts
    shard_lse, shard_x_logit = parts(z_here, weight, bias, view.local)
    lse = torch.logsumexp(gather_over_shards(shard_lse, layout), dim=0)
    return view.full.row_sums() * lse - sum_over_shards(shard_x_logit, layout)


def shard_input_gather(local: CSRBatch, coef: torch.Tensor, weight_t: torch.Tensor, sparse_grad: bool,
                       impl: str | None = None) -> torch.Tensor:
    """Σ_{i in nz(u), in shard} coef_ui·weight_t[i] per user, [B, H], with fc1's implementations
    (recvae_fast.ops.dispatch's rule for sparse_input_layer): "torch" and "cpp" the registered op on
    the coefficients (row-sparse gradient with sparse_grad); "triton" the kernel, which computes each row's
    coefficients from its values (x / ‖x‖): given the coefficients as values, it divides them by
    their shard-local norm r_u, which the result multiplies back (r_u = 0 only where every
    coefficient is 0, and then the row is 0 anyway)."""
    impl = resolve_impl("sparse_input_layer", impl, weight_t.device, compute_dtype(weight_t))
    if impl == "triton":
        kernel = import_kernel("sparse_input_layer", "sparse_input_layer")
        as_values = CSRBatch(local.indptr, local.indices, coef, local.n_cols)
        local_norm = torch.zeros(local.n_rows, dtype=coef.dtype, device=coef.device)
        local_norm = local_norm.index_add(0, local.row_ids(), coef * coef).sqrt()
        return kernel(as_values, weight_t, None, 0.0, sparse_grad=sparse_grad) * local_norm[:, None]
    no_bias = weight_t.new_zeros(weight_t.shape[1])
    return weighted_row_gather(local.indptr, local.indices, coef, weight_t, no_bias, sparse_grad, impl == "cpp")


class ShardedInputLinear(nn.Module):
    """This rank's rows of fc1 (weight_t, n_local × H) and the replicated bias. like_one_device: drawn
    as SparseInputLinear(n_items, H) draws them (see draw_rows_like_one_device); else left empty."""

    def __init__(self, layout: ItemLayout, out_features: int, like_one_device: bool = False):
        super().__init__()
        self.layout = layout
        self.weight_t = nn.Parameter(torch.empty(layout.n_local, out_features))
        # True: weight_t.grad is a sparse COO tensor of the batch's rows in the shard (recvae_fast.optim).
        self.sparse_grad = False
        self.bias = nn.Parameter(torch.empty(out_features))
        if like_one_device:  # recvae_fast.model.SparseInputLinear's initialisation, in its order
            bound = 1 / math.sqrt(layout.n_items)
            draw_rows_like_one_device(self.weight_t, layout.n_items, layout.lo, lambda t: nn.init.uniform_(t, -bound, bound))
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, view: ShardView, dropout_rate: float, keep_mask: torch.Tensor | None = None, impl=None):
        if keep_mask is not None and keep_mask.shape != (view.full.nnz,):
            raise ValueError(f"keep_mask must have one entry per nonzero ({view.full.nnz}), got {tuple(keep_mask.shape)}")
        # From the full rows: the norm and the one dropout mask of the one-device model.
        coef = input_coefficients(view.full, dropout_rate, keep_mask)[view.selected]
        partial = shard_input_gather(view.local, coef, self.weight_t, self.sparse_grad, impl)
        return sum_over_shards(partial, self.layout) + self.bias


def sharded_encoder(layout: ItemLayout, hidden_dim: int, latent_dim: int, like_one_device: bool = False) -> Encoder:
    """The model's encoder with this rank's shard of fc1; it reads a ShardView instead of a batch."""
    return Encoder(hidden_dim, latent_dim, 0, fc1=ShardedInputLinear(layout, hidden_dim, like_one_device))


class ShardedDecoder(nn.Module):
    """This rank's rows of the decoder: weight (n_local × K) and bias (n_local). like_one_device: drawn
    as nn.Linear(K, n_items) draws them; else left empty."""

    def __init__(self, layout: ItemLayout, latent_dim: int, like_one_device: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(layout.n_local, latent_dim))
        self.bias = nn.Parameter(torch.empty(layout.n_local))
        if like_one_device:  # nn.Linear.reset_parameters, in its order
            draw_rows_like_one_device(self.weight, layout.n_items, layout.lo,
                                      lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5)))
            bound = 1 / math.sqrt(latent_dim)
            draw_rows_like_one_device(self.bias, layout.n_items, layout.lo, lambda t: nn.init.uniform_(t, -bound, bound))


# Parameters split by item rows, by their name in the authors' state_dict; the value is the row
# dimension there (fc1's weight is H × I in the authors' layout).
SHARDED_KEYS = {
    "encoder.fc1.weight": 1,
    "prior.encoder_old.fc1.weight": 1,
    "decoder.weight": 0,
    "decoder.bias": 0,
}


class ShardedRecVAE(nn.Module):
    """RecVAE on an item layout (see recvae_fast.distributed.mesh.item_layout). Its parameters are the
    authors' ones, sharded by rows for SHARDED_KEYS.

    init "blocked" (default): `seed` initialises fc1 and the decoder the same way for any layout (see
    reset_item_parameters). init "one-device": every parameter takes the value RecVAE(hidden_dim,
    latent_dim, n_items) would take from torch's generator in its current state, and the generator is
    left where that constructor leaves it (`seed` unused): after torch.manual_seed(s), the weights of
    one-device training with seed s. It draws all I × (2·H + K + 1) numbers on every rank (about
    12-19 ns a number on one CPU core), which one device's initialisation costs too.
    `impl` picks the implementation of the ops on the shard, as RecVAE's does (recvae_fast.ops.dispatch)."""

    def __init__(self, layout: ItemLayout, hidden_dim: int = 600, latent_dim: int = 200, seed: int = 0,
                 impl: str | None = None, init: str = "blocked"):
        super().__init__()
        if hidden_dim <= 0 or latent_dim <= 0:
            raise ValueError(f"hidden_dim and latent_dim must be positive, got {hidden_dim}, {latent_dim}")
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        self.layout = layout
        self.hidden_dim, self.latent_dim, self.input_dim = hidden_dim, latent_dim, layout.n_items
        self.impl = impl
        like_one_device = init == "one-device"
        # RecVAE's construction order: encoder, prior (its old encoder), decoder.
        self.encoder = sharded_encoder(layout, hidden_dim, latent_dim, like_one_device)
        self.prior = CompositePrior(hidden_dim, latent_dim, 0,
                                    encoder_old=sharded_encoder(layout, hidden_dim, latent_dim, like_one_device))
        self.decoder = ShardedDecoder(layout, latent_dim, like_one_device)
        if not like_one_device:
            self.reset_item_parameters(seed)

    impl = RecVAE.impl
    reparameterize = RecVAE.reparameterize

    def shard_tensors(self) -> dict[str, torch.Tensor]:
        """The sharded parameters by their authors' name, as this rank's rows (row dimension first)."""
        return {
            "encoder.fc1.weight": self.encoder.fc1.weight_t,
            "prior.encoder_old.fc1.weight": self.prior.encoder_old.fc1.weight_t,
            "decoder.weight": self.decoder.weight,
            "decoder.bias": self.decoder.bias,
        }

    def replicated_tensors(self) -> dict[str, torch.Tensor]:
        """Every other parameter, by its authors' name."""
        out = {}
        for name, p in self.named_parameters():
            key = name[: -len("_t")] if name.endswith("fc1.weight_t") else name
            if key not in SHARDED_KEYS:
                out[key] = p
        return out

    @torch.no_grad()
    def reset_item_parameters(self, seed: int) -> None:
        """nn.Linear's initialisation (uniform ±1/sqrt(fan_in)) for fc1 and the decoder, the sharded rows
        drawn in blocks of INIT_BLOCK_ROWS global rows, each from its own generator: the same weights
        for any layout. The old encoder's fc1 starts equal to the encoder's (update_prior overwrites it
        anyway). The other layers take nn.Linear's own initialisation from torch's generator, the same
        on every rank since every rank seeds it alike."""
        lo, hi = self.layout.lo, self.layout.hi
        fc1_bound = 1 / math.sqrt(self.input_dim)
        dec_bound = 1 / math.sqrt(self.latent_dim)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 1_000_001)
        fc1_bias = (torch.rand(self.hidden_dim, generator=gen, dtype=torch.float64) * 2 - 1) * fc1_bound
        self.encoder.fc1.bias.copy_(fc1_bias)
        self.prior.encoder_old.fc1.bias.copy_(fc1_bias)
        first_block = lo // INIT_BLOCK_ROWS
        for block in range(first_block, (hi - 1) // INIT_BLOCK_ROWS + 1):
            b_lo = block * INIT_BLOCK_ROWS
            b_hi = min(b_lo + INIT_BLOCK_ROWS, self.input_dim)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + block)
            n = b_hi - b_lo
            fc1 = torch.rand(n, self.hidden_dim, generator=gen, dtype=torch.float64) * 2 - 1
            dec_w = torch.rand(n, self.latent_dim, generator=gen, dtype=torch.float64) * 2 - 1
            dec_b = torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1
            s_lo, s_hi = max(lo, b_lo) - b_lo, min(hi, b_hi) - b_lo  # this shard's part of the block
            d_lo, d_hi = s_lo + b_lo - lo, s_hi + b_lo - lo
            self.encoder.fc1.weight_t[d_lo:d_hi] = fc1[s_lo:s_hi] * fc1_bound
            self.prior.encoder_old.fc1.weight_t[d_lo:d_hi] = fc1[s_lo:s_hi] * fc1_bound
            self.decoder.weight[d_lo:d_hi] = dec_w[s_lo:s_hi] * dec_bound
            self.decoder.bias[d_lo:d_hi] = dec_b[s_lo:s_hi] * dec_bound

    @torch.no_grad()
    def load_full_state_dict(self, state_dict: dict) -> None:
        """Take the authors'-format state_dict of a whole model (e.g. RecVAE.state_dict()): this rank
        copies its rows of the sharded parameters and all the replicated ones."""
        lo, hi = self.layout.lo, self.layout.hi
        expected = {k: (self.input_dim, v.shape[1]) if v.dim() == 2 else (self.input_dim,)
                    for k, v in self.shard_tensors().items()}
        missing = [k for k in list(expected) + list(self.replicated_tensors()) if k not in state_dict]
        if missing:
            raise KeyError(f"the state_dict lacks {', '.join(missing)}")
        for key, param in self.shard_tensors().items():
            value = state_dict[key]
            value = value.t() if SHARDED_KEYS[key] == 1 else value
            if tuple(value.shape) != expected[key]:
                raise ValueError(f"{key} has shape {tuple(state_dict[key].shape)}, which does not fit "
                                 f"{self.input_dim} items, hidden {self.hidden_dim}, latent {self.latent_dim}")
            param.copy_(value[lo:hi])
        for key, param in self.replicated_tensors().items():
            if tuple(state_dict[key].shape) != tuple(param.shape):
                raise ValueError(f"{key} has shape {tuple(state_dict[key].shape)}, the model expects {tuple(param.shape)}")
            param.copy_(state_dict[key])

    def view(self, user_ratings) -> ShardView:
        param = self.decoder.weight
        batch = as_csr_batch(user_ratings, self.input_dim, dtype=param.dtype, device=param.device)
        return ShardView(batch, self.layout.lo, self.layout.hi)

    def user_terms(self, view: ShardView, beta=None, gamma=1, dropout_rate=0.5, *, with_kl=True,
                   keep_mask=None, eps=None, posterior=None, old_posterior=None):
        """Per-user (−mll_u, kl_u·w_u) for the batch (kl None without with_kl). Same random draws,
        in the same order, as RecVAE.loss_terms: the keep mask over all nonzeros, then ε.
        posterior and old_posterior: as RecVAE.loss_terms, for the view's users."""
        if with_kl:
            if gamma:
                kl_weight = gamma * view.full.row_sums()
            elif beta:
                kl_weight = beta
            else:
                raise ValueError("give gamma (KL weight gamma * n_u) or beta (constant KL weight)")
        if posterior is None:
            mu, logvar = self.encoder(view, dropout_rate, keep_mask, impl=self.impl)
        else:
            shape = (view.full.n_rows, self.latent_dim)
            mu, logvar = check_given_posterior(posterior, shape, self.decoder.weight, dropout_rate, keep_mask)
        if eps is None and self.training:
            eps = torch.randn_like(mu)  # what reparameterize would draw
        z = self.reparameterize(mu, logvar, eps)
        nll = sharded_multinomial_nll(z, self.decoder.weight, self.decoder.bias, view, self.layout, self.impl)
        if not with_kl:
            return nll, None
        noise = eps if self.training else torch.zeros_like(mu)  # in eval z = mu
        kl = self.prior.kl(view, mu, logvar, noise, self.impl, old_posterior).mul(kl_weight)
        return nll, kl

    def loss_terms(self, view: ShardView, beta=None, gamma=1, dropout_rate=0.5, *, with_kl=True,
                   keep_mask=None, eps=None, posterior=None, old_posterior=None):
        """(mll, kld) as RecVAE.loss_terms: means over the batch's users."""
        nll, kl = self.user_terms(view, beta, gamma, dropout_rate, with_kl=with_kl, keep_mask=keep_mask, eps=eps,
                                  posterior=posterior, old_posterior=old_posterior)
        return -nll.mean(), None if kl is None else kl.mean()

    @torch.no_grad()
    def update_prior(self):
        for old, new in zip(self.prior.encoder_old.parameters(), self.encoder.parameters()):
            old.copy_(new)
