"""Sparse encoder input layer of RecVAE as Triton kernels.

    h1_pre[u] = b1 + Σ_{i∈nz(u)} c_ui·W1[i],   c_ui = x_ui·m_ui / ((1 − p)·‖x_u‖)
    dW1[i]    = Σ_u c_ui·dh1_pre[u],           db1 = Σ_u dh1_pre[u]

(p = dropout_rate, m_ui the dropout keep mask.) W1 is stored I × H (`weight_t`), so the forward
is a gather of whole rows of W1, one per nonzero: nothing of size B × I exists. The pieces:

- `_fwd_kernel`: grid (users, H tiles). A program reads its user's nonzeros twice: once for the
  squared L2 norm (values only), once for the gather, where it folds the norm, the inverted dropout
  and the bias into c_ui on the fly. Dropout draws Philox numbers with `tl.rand(seed, k)`, k the
  global index of the nonzero, so the mask depends only on (seed, nnz, p); `dropout_keep_mask` runs
  the same `_keep` helper and returns it. When a gradient of W1 is wanted, the H-tile-0 program also
  writes c_ui and the user of each nonzero (nnz floats + nnz int32): the backward reuses the exact
  coefficients, so it sees the same mask by construction and needs no RNG, norm or repeat_interleave.
- dW1 has two implementations, chosen by `grad_method` (both give either gradient layout):
  - "segment" (default), `_bwd_kernel`: a segment reduction over the nonzeros sorted by item
    (torch.sort, O(nnz)). Grid (row tiles, H tiles); a program owns BLOCK_R output rows and reads the
    contiguous run of sorted nonzeros that falls in them (two loads of a segment pointer), gathers
    dh1_pre[u] for each, scales it by c_ui and adds it to its rows with a one-hot
    [BLOCK_R × BLOCK_NZ] product (exact: the one-hot entries are 0/1 and the dot is "ieee"/fp64).
  - "atomic", `_bwd_atomic_kernel`: grid (users, H tiles), like the forward; a program loads
    dh1_pre[u, h-tile] once and walks its user's nonzeros in CSR order, `tl.atomic_add`-ing
    c_ui·dh1_pre[u] into the output row of each (the item id for the dense gradient, zero-filled
    I × H first; the item's position among the batch's unique items for the row-sparse one, U × H).
    fp16/bf16 parameters accumulate in an fp32 buffer cast at the end. The order of the additions,
    hence the rounding of dW1, varies from run to run.
    This is a measured alternative, not a default: its caller is
    benches/gpu_check_sparse_input_layer.py, which times both methods on both layouts on a GPU
    (the choice of the default waits on that measurement) and checks the atomic gradients at 1M
    and 4M items. Why segment is the default until then: every output row is written exactly once
    (no separate zero fill: at 1M items a memset of 2.4 GB costs as much as the whole scatter),
    popular items (power-law data) get up to B nonzeros, which atomics serialise on one address,
    and the result is deterministic.
- db1 = dh1_pre.sum(0) in torch (B × H, one small reduction).
- Forward and dW1 are ops registered with torch.library.triton_op (`recvae_fast::triton_sparse_input_layer`,
  `recvae_fast::triton_sparse_input_layer_backward`), the autograd formula registered on the forward.

Gradient layouts (`sparse_grad`): False gives the dense I × H dW1. True gives a coalesced torch
sparse COO tensor of shape I × H whose rows are the items of the batch (indices sorted): at 1M
items this avoids writing 2.4 GB in backward, and lets the optimiser skip reading it (see
kernels/row_sparse_adam.py). It costs one device→host sync (the number of unique items sizes the
result). Autograd accepts a sparse gradient for the dense parameter (as nn.Embedding(sparse=True)
does); torch.optim.Adam does not accept it.

Not fused: swish and LayerNorm1. LN needs the whole H row in one program (BLOCK_H = 1024 for H = 600,
41 % of the gather wasted) and the op's contract returns h1_pre; on B × H = 300k elements the torch
elementwise/LN kernels cost a few µs each.

Precision: fp32/bf16/fp16 accumulate in fp32, fp64 in fp64. 1/(1 − p) is passed as a one-element
tensor of the accumulation dtype (Triton passes Python floats as fp32). All index × stride products
are int64 (I × H passes 2³¹ at 3.6M items for H = 600). Absent tensors (bias, keep mask, the
backward's coefficients) are passed as None with a constexpr flag.

Autotuning (GPU only): the keys are what changes the best tile: H, and power-of-two buckets of the
number of users or output rows (I for the dense gradient, U for the row-sparse one) and of the
nonzeros per user or per row. Trial launches time the kernel alone (see `_launch_bwd_atomic`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ._common import INT32_MAX, INTERPRET, SUPPORTED_DTYPES, acc_dtypes, check_batch, check_runs_here, on_device
from ._common import config as _cfg
from ._common import size_bucket

__all__ = ["sparse_input_layer", "dropout_keep_mask"]

_GRAD_METHODS = ("segment", "atomic")


# ----------------------------------------------------------------------------------------------
# Tile configurations: a few, autotuned on GPUs; one small config in the interpreter so that the
# autotuner never benchmarks there. The forward and the segment backward write each of their
# outputs completely (nothing is accumulated into a caller's buffer), so autotuning's repeated
# launches are harmless; the atomic backward is handled in `_launch_bwd_atomic`.
# ----------------------------------------------------------------------------------------------
GPU_CONFIGS = {
    # H = 600 → 5 tiles of 128 (6.7 % padding) or 10 of 64; B ≈ 500 users → 2500–5000 programs.
    "fwd": [
        _cfg(4, 2, BLOCK_H=128, BLOCK_NZ=16),
        _cfg(4, 3, BLOCK_H=128, BLOCK_NZ=32),
        _cfg(2, 2, BLOCK_H=64, BLOCK_NZ=32),
        _cfg(4, 2, BLOCK_H=256, BLOCK_NZ=16),
        _cfg(8, 2, BLOCK_H=256, BLOCK_NZ=32),
    ],
    # Dense gradients are dominated by writing I × H (mostly zero rows: wide tiles, fewer programs);
    # row-sparse ones by the gather of dh1_pre (narrow row tiles, less one-hot waste).
    "bwd": [
        _cfg(4, 2, BLOCK_R=16, BLOCK_H=128, BLOCK_NZ=16),
        _cfg(4, 2, BLOCK_R=32, BLOCK_H=128, BLOCK_NZ=16),
        _cfg(8, 2, BLOCK_R=64, BLOCK_H=128, BLOCK_NZ=16),
        _cfg(4, 2, BLOCK_R=16, BLOCK_H=256, BLOCK_NZ=16),
        # 4 warps, not 2: with 2 the row-sparse gather hit 255 registers and spilled 84–100 B
        # (bf16 / fp16, triton 3.6, sm_90 and sm_80)
        _cfg(4, 2, BLOCK_R=16, BLOCK_H=64, BLOCK_NZ=32),
    ],
    # Atomic scatter: one program per (user, H tile), like the forward.
    "bwd_atomic": [
        _cfg(4, 1, BLOCK_H=128, BLOCK_NZ=16),
        _cfg(4, 1, BLOCK_H=128, BLOCK_NZ=32),
        _cfg(2, 1, BLOCK_H=64, BLOCK_NZ=32),
        _cfg(8, 1, BLOCK_H=256, BLOCK_NZ=16),
    ],
}
_INTERPRETER_CONFIGS = {
    "fwd": [_cfg(4, 1, BLOCK_H=64, BLOCK_NZ=16)],
    "bwd": [_cfg(4, 1, BLOCK_R=16, BLOCK_H=64, BLOCK_NZ=16)],
    "bwd_atomic": [_cfg(4, 1, BLOCK_H=64, BLOCK_NZ=16)],
}
_CONFIGS = _INTERPRETER_CONFIGS if INTERPRET else GPU_CONFIGS


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _keep(seed, offs, p):
    """Dropout keep-mask of the nonzeros at global positions `offs` (int32): P(keep) = 1 − p."""
    return tl.rand(seed, offs) >= p


@triton.jit(do_not_specialize=["seed"])
def _keep_mask_kernel(OUT, n, seed, p, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(OUT + offs, _keep(seed, offs, p).to(tl.int8), mask=m)


@triton.jit(do_not_specialize=["seed"])
def _fwd_kernel(
    OUT, W, BIAS, INDPTR, INDICES, VALUES, KEEP, SCALE, COEF, ROWS,
    H, stride_w0, stride_w1, stride_out, seed, p, USERS_BUCKET, NNZ_BUCKET,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, WRITE_AUX: tl.constexpr,
    ACC: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_NZ: tl.constexpr,
):
    """h1_pre[u, h-tile] for one user. DROPOUT: 0 none, 1 mask from `seed`, 2 mask from KEEP.
    BIAS (HAS_BIAS), KEEP (DROPOUT 2), SCALE (DROPOUT != 0), COEF and ROWS (WRITE_AUX) are None
    when unused. USERS_BUCKET and NNZ_BUCKET are only autotuning keys."""
    u = tl.program_id(0)
    pid_h = tl.program_id(1)
    start = tl.load(INDPTR + u).to(tl.int64)
    end = tl.load(INDPTR + u + 1).to(tl.int64)

    # Pass 1: ‖x_u‖² over the values (a user has tens of nonzeros: cheap, and keeps the op one launch).
    sq = tl.zeros([BLOCK_NZ], dtype=ACC)
    for k0 in range(start, end, BLOCK_NZ):
        offs = k0 + tl.arange(0, BLOCK_NZ)
        v = tl.load(VALUES + offs, mask=offs < end, other=0.0).to(ACC)
        sq += v * v
    norm = tl.sqrt(tl.sum(sq, axis=0))
    # An empty (or all-zero) user: every c_ui is 0, so h1_pre = b1 and never 0/0.
    inv = 1.0 / tl.where(norm > 0, norm, 1.0)
    if DROPOUT != 0:
        inv = inv * tl.load(SCALE).to(ACC)  # 1 / (1 − p), in the accumulation dtype

    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    col = offs_h.to(tl.int64) * stride_w1
    acc = tl.zeros([BLOCK_H], dtype=ACC)
    # Pass 2: the gather. Row offsets in int64: item × H passes 2³¹ at 3.6M items.
    for k0 in range(start, end, BLOCK_NZ):
        offs = k0 + tl.arange(0, BLOCK_NZ)
        m = offs < end
        item = tl.load(INDICES + offs, mask=m, other=0).to(tl.int64)
        c = tl.load(VALUES + offs, mask=m, other=0.0).to(ACC) * inv
        if DROPOUT == 1:
            c = tl.where(_keep(seed, offs.to(tl.int32), p), c, 0.0)
        elif DROPOUT == 2:
            c = tl.where(tl.load(KEEP + offs, mask=m, other=0) != 0, c, 0.0)
        if WRITE_AUX:
            row = tl.zeros([BLOCK_NZ], dtype=tl.int32) + u
            aux_mask = m & ((row * 0 + pid_h) == 0)
            tl.store(COEF + offs, c, mask=aux_mask)
            tl.store(ROWS + offs, row, mask=aux_mask)
        w = tl.load(W + item[:, None] * stride_w0 + col[None, :], mask=m[:, None] & h_mask[None, :], other=0.0)
        acc += tl.sum(c[:, None] * w.to(ACC), axis=0)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_h, mask=h_mask, other=0.0).to(ACC)
    tl.store(OUT + u.to(tl.int64) * stride_out + offs_h, acc.to(OUT.dtype.element_ty), mask=h_mask)


@triton.jit
def _bwd_kernel(
    DW, DH, PERM, SEG, COEF, ROWS, SEGPTR,
    R, H, stride_dw, stride_dh, R_BUCKET, NNZ_BUCKET,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_NZ: tl.constexpr,
):
    """Rows [r0, r0 + BLOCK_R) of dW (R rows: all items, or the unique items of the batch).

    The nonzeros sorted by output row: PERM[k] is the original position of the k-th, SEG[k] its
    output row, and the rows [a, b) own the sorted nonzeros [SEGPTR[a], SEGPTR[b]). Rows with no
    nonzero are written as zeros. R_BUCKET and NNZ_BUCKET are only autotuning keys."""
    pid_r = tl.program_id(0)
    pid_h = tl.program_id(1)
    r0 = pid_r.to(tl.int64) * BLOCK_R
    r_end = tl.minimum(r0 + BLOCK_R, R)
    lo = tl.load(SEGPTR + r0).to(tl.int64)
    hi = tl.load(SEGPTR + r_end).to(tl.int64)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    acc = tl.zeros([BLOCK_R, BLOCK_H], dtype=ACC)
    for k0 in range(lo, hi, BLOCK_NZ):
        offs = k0 + tl.arange(0, BLOCK_NZ)
        m = offs < hi
        src = tl.load(PERM + offs, mask=m, other=0).to(tl.int64)
        seg = tl.load(SEG + offs, mask=m, other=-1).to(tl.int64)
        c = tl.load(COEF + src, mask=m, other=0.0).to(ACC)
        user = tl.load(ROWS + src, mask=m, other=0).to(tl.int64)
        g = tl.load(DH + user[:, None] * stride_dh + offs_h[None, :], mask=m[:, None] & h_mask[None, :], other=0.0)
        contrib = c[:, None] * g.to(ACC)
        # Segment sum into the tile's rows: a 0/1 matrix times the contributions (exact).
        onehot = (offs_r[:, None] == seg[None, :]).to(ACC)
        acc += tl.dot(onehot, contrib, input_precision="ieee", out_dtype=ACC)
    out_mask = (offs_r < R)[:, None] & h_mask[None, :]
    tl.store(DW + offs_r[:, None] * stride_dw + offs_h[None, :], acc.to(DW.dtype.element_ty), mask=out_mask)


@triton.jit
def _bwd_atomic_kernel(
    DW, DH, INDPTR, OUTROW, COEF,
    H, stride_dw, stride_dh, USERS_BUCKET, NNZ_BUCKET, R_BUCKET,
    BLOCK_H: tl.constexpr, BLOCK_NZ: tl.constexpr,
):
    """Adds c_ui·dh1_pre[u, h-tile] into DW[OUTROW[k], h-tile] for every nonzero k of user u.

    Grid (users, H tiles), the nonzeros in CSR order (INDPTR of the batch; COEF and OUTROW per
    nonzero). DW must be zero-filled by the caller and is accumulated in its own dtype (fp32 or
    fp64: the atomics' precision), so the order of the additions, hence the rounding, varies.
    The *_BUCKET arguments are only autotuning keys."""
    u = tl.program_id(0)
    pid_h = tl.program_id(1)
    start = tl.load(INDPTR + u).to(tl.int64)
    end = tl.load(INDPTR + u + 1).to(tl.int64)
    acc_ty = DW.dtype.element_ty
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    # dh1_pre[u, h-tile] is read once and reused for every nonzero of the user.
    g = tl.load(DH + u.to(tl.int64) * stride_dh + offs_h, mask=h_mask, other=0.0).to(acc_ty)
    for k0 in range(start, end, BLOCK_NZ):
        offs = k0 + tl.arange(0, BLOCK_NZ)
        m = offs < end
        # Row offsets in int64: item × H passes 2³¹ at 3.6M items.
        row = tl.load(OUTROW + offs, mask=m, other=0).to(tl.int64)
        c = tl.load(COEF + offs, mask=m, other=0.0).to(acc_ty)
        # Relaxed: nothing reads DW until the kernel ends, only the sums must be complete.
        tl.atomic_add(
            DW + row[:, None] * stride_dw + offs_h[None, :], c[:, None] * g[None, :],
            mask=m[:, None] & h_mask[None, :], sem="relaxed",
        )


_fwd = triton.autotune(configs=_CONFIGS["fwd"], key=["H", "USERS_BUCKET", "NNZ_BUCKET"])(_fwd_kernel)
_bwd = triton.autotune(configs=_CONFIGS["bwd"], key=["H", "R_BUCKET", "NNZ_BUCKET"])(_bwd_kernel)
# No reset_to_zero: the autotuner would time the zero fill with every trial (see _launch_bwd_atomic).
_bwd_atomic = triton.autotune(configs=_CONFIGS["bwd_atomic"], key=["H", "USERS_BUCKET", "NNZ_BUCKET", "R_BUCKET"])(
    _bwd_atomic_kernel)


# ----------------------------------------------------------------------------------------------
# Launch logic
# ----------------------------------------------------------------------------------------------
def _check_p(p: float) -> float:
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {p}")
    return p


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return seed


def dropout_keep_mask(seed: int, nnz: int, p: float, device) -> torch.Tensor:
    """The keep-mask (bool [nnz]) that `sparse_input_layer(..., dropout_rate=p, seed=seed)` applies to
    a batch with `nnz` nonzeros: the same Philox draw as the forward kernel (`_keep`)."""
    seed, p, nnz = _check_seed(seed), _check_p(p), int(nnz)
    if not 0 <= nnz <= INT32_MAX:
        raise ValueError(f"nnz must be in [0, 2**31), got {nnz}")
    device = torch.device(device)
    out = torch.empty(nnz, dtype=torch.uint8, device=device)
    if p == 0.0:
        return out.fill_(1).view(torch.bool)
    check_runs_here(device, "dropout_keep_mask", "sparse_input_layer's keep_mask argument with a torch mask")
    if nnz:
        block = 1024
        with on_device(out):
            _keep_mask_kernel[(triton.cdiv(nnz, block),)](out, nnz, seed, p, BLOCK=block)
    return out.view(torch.bool)


def _validate(batch, weight_t, bias, keep_mask):
    if not isinstance(weight_t, torch.Tensor) or weight_t.dim() != 2:
        raise ValueError("sparse_input_layer: weight_t must be a 2-D tensor [n_items, hidden]")
    n_items, hidden = weight_t.shape
    device, dtype = weight_t.device, weight_t.dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"weight_t must be float16, bfloat16, float32 or float64, got {dtype}")
    check_batch(batch, None, n_items, device, "sparse_input_layer")
    if bias is not None and (bias.shape != (hidden,) or bias.dtype != dtype or bias.device != device):
        raise ValueError(
            f"bias must be [{hidden}] {dtype} on {device}, got {tuple(bias.shape)} {bias.dtype} on {bias.device}"
        )
    if batch.values.dtype != dtype:
        raise TypeError(f"batch.values has dtype {batch.values.dtype}, weight_t has {dtype}")
    if keep_mask is not None:
        if keep_mask.dtype != torch.bool or keep_mask.shape != (batch.nnz,) or keep_mask.device != device:
            raise ValueError(
                f"keep_mask must be bool [{batch.nnz}] (one per nonzero) on {device}, got "
                f"{keep_mask.dtype} {tuple(keep_mask.shape)} on {keep_mask.device}"
            )
    check_runs_here(device, "sparse_input_layer", "recvae_fast.torch_ops.sparse_input_layer")


def _forward(indptr, indices, values, weight_t, bias, p, keep_mask, seed, write_aux):
    n_users, hidden = indptr.numel() - 1, weight_t.shape[1]
    nnz = indices.numel()
    device = weight_t.device
    acc_torch, acc_tl = acc_dtypes(weight_t.dtype)
    out = torch.empty(n_users, hidden, dtype=weight_t.dtype, device=device)
    coef = torch.empty(nnz, dtype=acc_torch, device=device) if write_aux else None
    rows = torch.empty(nnz, dtype=torch.int32, device=device) if write_aux else None
    keep = scale = None
    if p == 0.0:
        mode = 0
    else:
        scale = torch.full((1,), 1.0 / (1.0 - p), dtype=acc_torch, device=device)
        mode = 1 if keep_mask is None else 2
        if keep_mask is not None:
            keep = keep_mask.view(torch.uint8)
    if n_users and hidden:
        grid = lambda meta: (n_users, triton.cdiv(hidden, meta["BLOCK_H"]))  # noqa: E731
        with on_device(weight_t):
            wrap_triton(_fwd)[grid](
                out, weight_t, bias, indptr, indices, values, keep, scale, coef, rows,
                hidden, weight_t.stride(0), weight_t.stride(1), out.stride(0), seed, p,
                size_bucket(n_users), size_bucket(nnz // n_users),
                HAS_BIAS=bias is not None, DROPOUT=mode, WRITE_AUX=write_aux, ACC=acc_tl,
            )
    return out, coef, rows


def _sorted_nonzeros(indices: torch.Tensor, n_items: int):
    """The nonzeros sorted by item: (sorted items, permutation). int32 keys when they fit (half the
    radix passes); stable, so the summation order, hence the gradient, is deterministic."""
    keys = indices.to(torch.int32) if n_items <= INT32_MAX else indices
    return torch.sort(keys, stable=True)


def _launch_bwd(out, grad_out, perm, seg, coef, rows, segptr, n_out_rows, acc_tl):
    hidden = grad_out.shape[1]
    if n_out_rows == 0 or hidden == 0:
        return out
    grid = lambda meta: (triton.cdiv(n_out_rows, meta["BLOCK_R"]), triton.cdiv(hidden, meta["BLOCK_H"]))  # noqa: E731
    with on_device(out):
        wrap_triton(_bwd)[grid](
            out, grad_out, perm, seg, coef, rows, segptr,
            n_out_rows, hidden, out.stride(0), grad_out.stride(0),
            size_bucket(n_out_rows), size_bucket(perm.numel() // n_out_rows),
            ACC=acc_tl,
        )
    return out


def _grad_weight_dense(grad_out, indices, coef, rows, n_items, dtype):
    sorted_items, perm = _sorted_nonzeros(indices, n_items)
    # segptr[i] = first sorted nonzero of item i, for all I + 1 boundaries (no sync; O(I) ints).
    boundaries = torch.arange(n_items + 1, device=indices.device, dtype=sorted_items.dtype)
    segptr = torch.searchsorted(sorted_items, boundaries)
    out = torch.empty(n_items, grad_out.shape[1], dtype=dtype, device=grad_out.device)
    return _launch_bwd(out, grad_out, perm, sorted_items, coef, rows, segptr, n_items, acc_dtypes(dtype)[1])


def _grad_weight_row_sparse(grad_out, indices, coef, rows, n_items, dtype):
    sorted_items, perm = _sorted_nonzeros(indices, n_items)
    # One sync here: the number of unique items sizes the result.
    uniq, seg, counts = torch.unique_consecutive(sorted_items, return_inverse=True, return_counts=True)
    segptr = torch.zeros(uniq.numel() + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(counts, 0, out=segptr[1:])
    values = torch.empty(uniq.numel(), grad_out.shape[1], dtype=dtype, device=grad_out.device)
    _launch_bwd(values, grad_out, perm, seg, coef, rows, segptr, uniq.numel(), acc_dtypes(dtype)[1])
    return uniq.to(torch.int64), values


def _launch_bwd_atomic(out, grad_out, indptr, out_rows, coef):
    """Adds the scatter into the zero-filled `out`. When this launch autotunes (a new key, several
    configs), every trial adds into `out` and only the kernel is timed (no zero fill per trial);
    `out` is then zeroed once and the chosen config launched again on it. That check of the
    autotuner's cache needs the kernel itself, so this launch is not wrapped with wrap_triton:
    grad_method="atomic" (a measured alternative, see above) runs eager only, not under torch.compile."""
    n_users, hidden = grad_out.shape
    if n_users == 0 or hidden == 0 or out.shape[0] == 0:
        return out
    grid = lambda meta: (n_users, triton.cdiv(hidden, meta["BLOCK_H"]))  # noqa: E731
    args = (out, grad_out, indptr, out_rows, coef, hidden, out.stride(0), grad_out.stride(0),
            size_bucket(n_users), size_bucket(out_rows.numel() // n_users), size_bucket(out.shape[0]))
    with on_device(out):
        n_tuned = len(_bwd_atomic.cache)
        _bwd_atomic[grid](*args)
        if len(_bwd_atomic.cache) != n_tuned:  # this call ran the trials: out holds their sum
            out.zero_()
            _bwd_atomic[grid](*args)
    return out


def _grad_weight_dense_atomic(grad_out, indptr, indices, coef, n_items, dtype):
    # Output row = the item id. The I × H zero fill is part of this method's cost (2.4 GB at 1M
    # items). Atomics add in the buffer's dtype: fp16/bf16 parameters get an fp32 buffer, cast at
    # the end (one more I × H pass); for fp32/fp64 the cast is a no-op.
    acc_torch = acc_dtypes(dtype)[0]
    out = torch.zeros(n_items, grad_out.shape[1], dtype=acc_torch, device=grad_out.device)
    _launch_bwd_atomic(out, grad_out, indptr, indices, coef)
    return out.to(dtype)


def _grad_weight_row_sparse_atomic(grad_out, indptr, indices, coef, n_items, dtype):
    # Output row = the item's position among the batch's unique items (sorted). torch.unique sorts
    # (int32 keys when they fit, as `_sorted_nonzeros`) and syncs once: U sizes the result.
    keys = indices.to(torch.int32) if n_items <= INT32_MAX else indices
    uniq, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    acc_torch = acc_dtypes(dtype)[0]
    values = torch.zeros(uniq.numel(), grad_out.shape[1], dtype=acc_torch, device=grad_out.device)
    _launch_bwd_atomic(values, grad_out, indptr, inverse, coef)
    return uniq.to(torch.int64), values.to(dtype)


def _sparse_rows(rows: torch.Tensor, values: torch.Tensor, n_items: int) -> torch.Tensor:
    size = (n_items, values.shape[1])
    try:
        return torch.sparse_coo_tensor(rows[None, :], values, size, is_coalesced=True, check_invariants=False)
    except TypeError:  # older torch: no is_coalesced argument
        return torch.sparse_coo_tensor(rows[None, :], values, size)._coalesced_(True)


# ----------------------------------------------------------------------------------------------
# Registered ops (torch.library.triton_op): visible by name to the profiler, checked by opcheck,
# traceable by torch.compile (the segment kernels through wrap_triton). The batch is passed as its
# three CSR tensors. The row-sparse gradient leaves the backward op as (rows, values) and becomes a
# sparse COO tensor in the autograd formula (registered ops return strided tensors).
# ----------------------------------------------------------------------------------------------
@triton_op("recvae_fast::triton_sparse_input_layer", mutates_args=())
def sparse_input_layer_op(
    weight_t: Tensor, bias: Tensor | None, indptr: Tensor, indices: Tensor, values: Tensor, p: float,
    keep_mask: Tensor | None, seed: int, write_aux: bool, sparse_grad: bool, grad_method: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(h1_pre [B, H]; c_ui [nnz] and the user of each nonzero [nnz] when write_aux, else empty).
    sparse_grad and grad_method only shape the backward."""
    out, coef, rows = _forward(indptr, indices, values, weight_t, bias, p, keep_mask, seed, write_aux)
    if coef is None:
        acc_t = acc_dtypes(weight_t.dtype)[0]
        coef, rows = weight_t.new_empty(0, dtype=acc_t), weight_t.new_empty(0, dtype=torch.int32)
    return out, coef, rows


@sparse_input_layer_op.register_fake
def _(weight_t, bias, indptr, indices, values, p, keep_mask, seed, write_aux, sparse_grad, grad_method):
    nnz = indices.numel() if write_aux else 0
    return (weight_t.new_empty(indptr.numel() - 1, weight_t.shape[1]),
            weight_t.new_empty(nnz, dtype=acc_dtypes(weight_t.dtype)[0]), weight_t.new_empty(nnz, dtype=torch.int32))


@triton_op("recvae_fast::triton_sparse_input_layer_backward", mutates_args=())
def sparse_input_layer_backward_op(
    grad_out: Tensor, indptr: Tensor, indices: Tensor, coef: Tensor, rows: Tensor, n_items: int,
    dtype: torch.dtype, sparse_grad: bool, grad_method: str,
) -> tuple[Tensor, Tensor]:
    """dW1 as (item rows int64 [U], values [U, H]) when sparse_grad, else (empty, dense [I, H])."""
    g = grad_out.contiguous()
    if grad_method == "atomic":
        if sparse_grad:
            return _grad_weight_row_sparse_atomic(g, indptr, indices, coef, n_items, dtype)
        return indices.new_empty(0), _grad_weight_dense_atomic(g, indptr, indices, coef, n_items, dtype)
    if sparse_grad:
        return _grad_weight_row_sparse(g, indices, coef, rows, n_items, dtype)
    return indices.new_empty(0), _grad_weight_dense(g, indices, coef, rows, n_items, dtype)


@sparse_input_layer_backward_op.register_fake
def _(grad_out, indptr, indices, coef, rows, n_items, dtype, sparse_grad, grad_method):
    hidden = grad_out.shape[1]
    if sparse_grad:  # U, the number of unique items, is known only when the op runs
        n_unique = torch.library.get_ctx().new_dynamic_size()
        return indices.new_empty(n_unique), grad_out.new_empty(n_unique, hidden, dtype=dtype)
    return indices.new_empty(0), grad_out.new_empty(n_items, hidden, dtype=dtype)


def _setup_context(ctx, inputs, output):
    weight_t, _, indptr, indices, _, _, _, _, _, sparse_grad, grad_method = inputs
    _, coef, rows = output
    ctx.mark_non_differentiable(coef, rows)
    ctx.save_for_backward(indptr, indices, coef, rows)
    ctx.n_items, ctx.dtype, ctx.sparse_grad, ctx.grad_method = weight_t.shape[0], weight_t.dtype, sparse_grad, grad_method


def _backward(ctx, grad_out, *_unused):
    indptr, indices, coef, rows = ctx.saved_tensors
    grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        item_rows, values = sparse_input_layer_backward_op(
            grad_out, indptr, indices, coef, rows, ctx.n_items, ctx.dtype, ctx.sparse_grad, ctx.grad_method)
        grad_w = _sparse_rows(item_rows, values, ctx.n_items) if ctx.sparse_grad else values
    if ctx.needs_input_grad[1]:
        grad_b = grad_out.sum(0)
    return (grad_w, grad_b) + (None,) * 9


sparse_input_layer_op.register_autograd(_backward, setup_context=_setup_context)


def sparse_input_layer(
    batch,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None,
    dropout_rate: float = 0.0,
    keep_mask: torch.Tensor | None = None,
    seed: int | None = None,
    sparse_grad: bool = False,
    grad_method: str = "segment",
) -> torch.Tensor:
    """h1_pre [B, H] = b1 + Σ_{i∈nz(u)} c_ui·weight_t[i], c_ui = x_ui·m_ui / ((1 − p)·‖x_u‖).

    weight_t: [I, H] (I = batch.n_cols); bias: [H] (or None). Dropout (0 <= dropout_rate < 1) acts on
    the nonzeros: `keep_mask` (bool [nnz]) when given, else the Philox mask of `seed` (see
    `dropout_keep_mask`); seed None draws one from torch's default (CPU) generator, so
    torch.manual_seed makes runs reproducible. With dropout_rate == 0 no mask is applied. c_ui is
    computed per stored entry: on a canonical CSRBatch (no duplicate items in a row) that is the
    formula above; duplicates, if given, each contribute linearly.
    Gradients flow to weight_t and bias when they require grad; `sparse_grad=True` makes the
    weight_t gradient a coalesced sparse COO tensor holding only the rows of the batch's items.
    `grad_method` picks how dW1 is reduced (either layout): "segment" (default: item-sorted segment
    reduction, deterministic) or "atomic" (zero fill + atomic scatter; the summation order varies
    run to run), kept for benches/gpu_check_sparse_input_layer.py, which times both on a GPU.
    """
    if grad_method not in _GRAD_METHODS:
        raise ValueError(f"grad_method must be one of {_GRAD_METHODS}, got {grad_method!r}")
    p = _check_p(dropout_rate)
    _validate(batch, weight_t, bias, keep_mask)
    if p > 0.0 and keep_mask is None:
        seed = int(torch.randint(0, INT32_MAX, (1,)).item()) if seed is None else _check_seed(seed)
    else:
        seed = 0 if seed is None else _check_seed(seed)
    need_w = torch.is_grad_enabled() and weight_t.requires_grad  # c_ui is kept for dW1 only
    return sparse_input_layer_op(
        weight_t, bias, batch.indptr, batch.indices, batch.values, p, keep_mask, seed, need_w, bool(sparse_grad),
        grad_method,
    )[0]
