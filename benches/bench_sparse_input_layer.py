"""The sparse input layer against the dense torch first layer, forward + backward.

B = 500 users, H = 600, ~75 items per user, float32, dropout 0.5.
- fast: the op RecVAE runs on the device: on CUDA the Triton kernel
  (kernels/sparse_input_layer.sparse_input_layer), on the CPU recvae_fast.ops.sparse_input_layer (impl "cpp": embedding_bag
  over the nonzeros); then backward, with dW1 dense or row-sparse (sparse COO).
- reference: x dense B × I (given, not timed) → x/‖x‖ → dropout → addmm(b1, ·, W1) → backward,
  the authors' first layer.
CUDA: 20k and 1M items. Its floors are conservative placeholders, not measured: once a GPU ratio is
recorded in benches/RESULTS.md, set them below it with room for noise. CPU: 20,108 and 100k items
(the dense reference at 1M items would take minutes per call on two cores).
Correctness is tested in tests/test_op_sparse_input_layer.py, tests/test_model.py and
tools/gpu_check_sparse_input_layer.py.
"""
from __future__ import annotations

import pytest
import torch

N_USERS, HIDDEN, PER_USER, P = 500, 600, 75, 0.5

# device → [(items, grad layout, floor, rounds)]. CUDA estimates for an H100 with exact fp32
# products in the reference: ~0.5 ms vs ~0.1 ms at 20k items; ~25 ms vs ~1 ms (dense dW: writing
# 2.4 GB) or ~0.2 ms (row-sparse dW) at 1M items.
CASES = {
    "cuda": [
        (20_000, "dense", 1.2, 10),
        (20_000, "row_sparse", 1.2, 10),
        (1_000_000, "dense", 4.0, 5),
        (1_000_000, "row_sparse", 8.0, 5),
    ],
    # Measured on the 2-core CPU (benches/results/bench_sparse_input_layer.jsonl): 9.1-10.1x, 6.6-6.7x, 13.7-18.5x, 20.7-22.0x; floors
    # at half the lowest (benches/conftest.py).
    "cpu": [
        (20_108, "dense", 4.5, 5),
        (20_108, "row_sparse", 3.3, 5),
        (100_000, "dense", 6.5, 3),
        (100_000, "row_sparse", 10.0, 3),
    ],
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module", params=sorted({c[0] for c in CASES[DEVICE]}), ids=lambda n: f"{n}items")
def inputs(request):
    from batches import user_item_batch

    from recvae_fast.sparse import as_csr_batch

    n_items = request.param
    device = torch.device(DEVICE)
    x = user_item_batch(N_USERS, n_items, PER_USER, vary=True)
    batch = as_csr_batch(x, n_items, dtype=torch.float32, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    w = torch.empty(n_items, HIDDEN, device=device).uniform_(-1e-3, 1e-3, generator=gen).requires_grad_(True)
    b = torch.zeros(HIDDEN, device=device, requires_grad=True)
    g = torch.randn(N_USERS, HIDDEN, device=device, generator=gen)
    x_dense = batch.to_dense()
    norm = x_dense.norm(dim=1, keepdim=True).clamp_min_(1e-30)
    yield dict(n_items=n_items, batch=batch, w=w, b=b, g=g, x=x_dense, norm=norm)
    del x_dense, w


@pytest.mark.parametrize("layout", ["dense", "row_sparse"])
def test_sparse_input_layer_vs_dense_first_layer(inputs, layout, compare_speed):
    if DEVICE == "cuda":
        from recvae_fast.kernels.sparse_input_layer import sparse_input_layer
    else:
        from recvae_fast.ops.sparse_input_layer import sparse_input_layer  # impl "cpp", the CPU default

    (floor, rounds), = [(c[2], c[3]) for c in CASES[DEVICE] if c[0] == inputs["n_items"] and c[1] == layout]
    batch, w, b, g, x, norm = (inputs[k] for k in ("batch", "w", "b", "g", "x", "norm"))
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")

    def fast():
        w.grad = b.grad = None
        sparse_input_layer(batch, w, b, P, sparse_grad=layout == "row_sparse").backward(g)

    def reference():
        w.grad = b.grad = None
        mask = torch.rand_like(x) >= P
        torch.addmm(b, x / norm * mask / (1 - P), w).backward(g)

    sync = torch.cuda.synchronize if DEVICE == "cuda" else None
    try:
        fast()  # autotuning happens on the first call (CUDA)
        compare_speed(fast, reference, floor=floor, rounds=rounds, warmup=1, sync=sync)
    finally:
        torch.set_float32_matmul_precision(old)
        w.grad = b.grad = None
