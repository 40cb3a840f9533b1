"""Training throughput: one epoch of recvae_fast.fit against the authors' loop over the reference.

ML-20M item count (20,108) with 1,500 users of 75 items each, H 600, K 200, batch 500: one epoch
is 3 encoder passes, update_prior, 1 decoder pass (12 steps), as in the authors' run.py. Both
sides shuffle users each pass; the reference gets dense batches, as the authors' loader gives.
Two epochs: from the second on, fit's encoder steps read the prior's old posterior that the
decoder pass kept (recvae_fast.posterior_cache); in the first, its first pass computes it.
"""
import numpy as np
import torch
from batches import user_item_batch

from recvae_fast import fit
from recvae_fast.testing.reference import VAE

N_ITEMS, N_USERS, ITEMS_PER_USER, BATCH, N_EPOCHS = 20_108, 1_500, 75, 500, 2
FLOOR = 2.7  # half the lowest measured ratio (5.43x, benches/results/bench_fit.jsonl)


def authors_epoch(model, opt_enc, opt_dec, train, rng, gamma=0.005):
    def run(opt, dropout):
        for start in range(0, N_USERS, BATCH):
            rows = rng.permutation(N_USERS)[start : start + BATCH]
            batch = torch.tensor(train[rows].toarray())
            opt.zero_grad()
            _, loss = model(batch, beta=None, gamma=gamma, dropout_rate=dropout)
            loss.backward()
            opt.step()

    model.train()
    for _ in range(3):
        run(opt_enc, 0.5)
    model.update_prior()
    run(opt_dec, 0.0)


def test_fit_epochs_speedup(compare_speed):
    train = user_item_batch(N_USERS, N_ITEMS, ITEMS_PER_USER)
    torch.manual_seed(0)
    ref = VAE(600, 200, N_ITEMS)
    opt_enc = torch.optim.Adam(ref.encoder.parameters(), lr=5e-4)
    opt_dec = torch.optim.Adam(ref.decoder.parameters(), lr=5e-4)
    rng = np.random.default_rng(0)

    def fast():
        fit(train, n_epochs=N_EPOCHS, batch_size=BATCH, progress=False)

    def reference():
        for _ in range(N_EPOCHS):
            authors_epoch(ref, opt_enc, opt_dec, train, rng)

    compare_speed(fast, reference, floor=FLOOR, rounds=3, warmup=1)
