"""torch.compile (Inductor, CPU, fullgraph=True) against eager: one training step at the ML-20M shape.

Shape: 20,108 items, batch 500, 75 items per user, H 600, K 200, float32, the ops RecVAE runs on
CPU tensors. A step is what `train_step` does: zero the phase's gradients, the loss
(`RecVAE.loss_terms` on a canonical CSRBatch), backward, Adam step. "fast" is the step with the loss compiled, "reference" the same step eager; the ratio is
eager time / compiled time, and its floor guards against compile becoming much slower than eager.
The encoder step uses the dense fc1 gradient: the row-sparse one (sparse=True embedding_bag) fails
to compile (Inductor, torch 2.13). Before timing, the compiled loss and gradients are checked
against eager with the randomness pinned (dropout mask and ε given).
"""
import pytest
import torch
from batches import user_item_batch

from recvae_fast import RecVAE
from recvae_fast.training import TrainConfig, make_optimizers

N_ITEMS, N_USERS, ITEMS_PER_USER, HIDDEN, LATENT = 20_108, 500, 75, 600, 200
FLOORS = {"encoder": 0.7, "decoder": 0.7}


def phase_loss(model, batch, phase, cfg, keep_mask=None, eps=None):
    """The loss train_step minimises in `phase` ("encoder": −ELBO with dropout; "decoder": −mll)."""
    dropout = cfg.dropout_rate if phase == "encoder" else 0.0
    mll, kld = model.loss_terms(batch, cfg.beta, cfg.gamma, dropout, with_kl=phase == "encoder",
                                keep_mask=keep_mask, eps=eps)
    return -mll if kld is None else kld - mll


@pytest.mark.parametrize("phase", ["encoder", "decoder"])
def test_compiled_step_speed(phase, compare_speed):
    torch.manual_seed(0)
    torch._dynamo.reset()
    cfg = TrainConfig(hidden_dim=HIDDEN, latent_dim=LATENT)
    eager_model = RecVAE(HIDDEN, LATENT, N_ITEMS)
    compiled_model = RecVAE(HIDDEN, LATENT, N_ITEMS)
    compiled_model.load_state_dict(eager_model.state_dict())
    for model in (eager_model, compiled_model):
        model.train()
        model.encoder.requires_grad_(phase == "encoder")
        model.decoder.requires_grad_(phase == "decoder")
    batch = eager_model.as_batch(user_item_batch(N_USERS, N_ITEMS, ITEMS_PER_USER))
    compiled_loss = torch.compile(phase_loss, fullgraph=True)

    # Same loss and gradients as eager, randomness pinned.
    keep_mask = torch.rand(batch.nnz) >= cfg.dropout_rate
    eps = torch.randn(N_USERS, LATENT)
    want = phase_loss(eager_model, batch, phase, cfg, keep_mask, eps)
    got = compiled_loss(compiled_model, batch, phase, cfg, keep_mask, eps)
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    for (name, p_eager), p_compiled in zip(eager_model.named_parameters(), compiled_model.parameters()):
        if p_eager.grad is not None:
            torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-4, atol=1e-6, msg=name)

    def step(loss_fn, model, optimizer):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model, batch, phase, cfg).backward()
        optimizer.step()

    which = 0 if phase == "encoder" else 1
    eager_opt = make_optimizers(eager_model, cfg.lr, sparse_fc1_grad=False)[which]
    compiled_opt = make_optimizers(compiled_model, cfg.lr, sparse_fc1_grad=False)[which]
    compare_speed(lambda: step(compiled_loss, compiled_model, compiled_opt),
                  lambda: step(phase_loss, eager_model, eager_opt),
                  floor=FLOORS[phase], rounds=7, warmup=2)
