"""The whole RecVAE through the Triton kernels (interpreter on the CPU) against the reference."""
from __future__ import annotations

import pytest
import torch
from helpers import grads_by_authors_name, model_pair, pinned_noise, random_ratings

pytest.importorskip("triton")


@pytest.mark.interpreter
@pytest.mark.parametrize("phase", ["encoder", "decoder", "both"])
def test_triton_backend_matches_reference(monkeypatch, phase):
    monkeypatch.setenv("RECVAE_FAST_BACKEND", "triton")
    n_users, n_items, hidden, latent = 9, 67, 19, 7
    dtype = torch.float64
    x = random_ratings(n_users, n_items, seed=10, max_items=12)
    fast, ref = model_pair(hidden, latent, n_items, dtype)
    dense_mask, keep, eps = pinned_noise(fast, x, latent, dtype)
    if phase == "encoder":
        fast.decoder.requires_grad_(False)
    if phase == "decoder":
        fast.encoder.requires_grad_(False)
    (mll, kld), loss = fast(x, gamma=0.005, dropout_rate=0.5, keep_mask=keep, eps=eps)
    (mll_r, kld_r), loss_r = ref(
        torch.tensor(x.toarray(), dtype=dtype), gamma=0.005, dropout_rate=0.5, dropout_mask=dense_mask, eps=eps
    )
    torch.testing.assert_close(mll, mll_r, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(kld, kld_r, rtol=1e-9, atol=1e-10)
    loss.backward()
    loss_r.backward()
    grads, grads_r = grads_by_authors_name(fast), grads_by_authors_name(ref)
    expected = {
        "encoder": {n for n in grads_r if n.startswith("encoder")},
        "decoder": {"decoder.weight", "decoder.bias"},
        "both": set(grads_r),
    }[phase]
    assert set(grads) == expected
    for name in expected:
        torch.testing.assert_close(grads[name], grads_r[name], rtol=1e-8, atol=1e-10, msg=name)
