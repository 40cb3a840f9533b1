"""Fused Triton multinomial NLL vs the dense torch path (logits -> log_softmax -> backward).

Needs CUDA: on a CPU-only machine the Triton op runs only in the interpreter, where timings
mean nothing, so the bench skips. The floors are conservative placeholders until a measured
ratio is recorded in benches/RESULTS.md (then set them below it, with room for noise).
"""
from __future__ import annotations

import pytest
import torch

N_USERS, N_ITEMS, LATENT, PER_USER = 500, 200_000, 200, 75

# (float32 matmul precision, floor): "high" lets both paths use tf32; "highest" makes the fused
# op multiply in exact fp32 (FMA, no tensor cores) against cuBLAS's fp32 GEMMs.
CASES = [("high", 1.0), ("highest", 0.3)]


@pytest.fixture
def cuda_inputs():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: without it the Triton kernels run only in the interpreter, meaningless for timing")
    from batches import user_item_batch

    from recvae_fast.sparse import as_csr_batch

    device = torch.device("cuda")
    x = user_item_batch(N_USERS, N_ITEMS, PER_USER, vary=True)
    batch = as_csr_batch(x, N_ITEMS, dtype=torch.float32, device=device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(N_USERS, LATENT, generator=gen).to(device).requires_grad_()
    w = (torch.randn(N_ITEMS, LATENT, generator=gen) / LATENT**0.5).to(device).requires_grad_()
    b = torch.zeros(N_ITEMS, device=device, requires_grad=True)
    return batch, z, w, b


@pytest.mark.parametrize("precision,floor", CASES, ids=[c[0] for c in CASES])
def test_multinomial_nll_fused_vs_dense(cuda_inputs, compare_speed, precision, floor):
    from recvae_fast.kernels.multinomial_nll import multinomial_nll

    batch, z, w, b = cuda_inputs
    x_dense = batch.to_dense()
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:

        def fused():
            out = multinomial_nll(z, w, b, batch)
            torch.autograd.grad(out.sum(), (z, w, b))

        def dense():
            out = -(torch.log_softmax(torch.addmm(b, z, w.T), dim=-1) * x_dense).sum(-1)
            torch.autograd.grad(out.sum(), (z, w, b))

        fused()  # compile and autotune outside the timed rounds
        compare_speed(fused, dense, floor=floor, rounds=7, warmup=2, sync=torch.cuda.synchronize)
    finally:
        torch.set_float32_matmul_precision(old)
