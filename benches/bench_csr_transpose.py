"""fc1's backward groups the batch's nonzeros by item before summing dW1's rows: on the CPU with the
dense gradient by recvae_fast::csr_transpose (a C++ counting sort), against the torch route it
replaced (stable argsort, bincount, cumsum and the gathers of users and coefficients), which the
row-sparse gradient still takes. B 500, ~75 items per user at dropout 0.5 (the kept nonzeros),
20,108 items. Correctness: tests/test_op_csr_row_sums.py (against that stable sort).
"""
from __future__ import annotations

import torch
from batches import user_item_batch

from recvae_fast.ops.sparse_rows import csr_transpose
from recvae_fast.sparse import as_csr_batch

N_USERS, N_ITEMS, PER_USER = 500, 20_108, 75
# Measured on the 2-core CPU, three runs: 2.70–4.30× (benches/results/bench_csr_transpose.jsonl); floor at half
# the lowest (benches/conftest.py).
FLOOR = 1.3


def test_group_by_item_vs_torch_sort(compare_speed):
    batch = as_csr_batch(user_item_batch(N_USERS, N_ITEMS, PER_USER), N_ITEMS, dtype=torch.float32)
    kept = torch.rand(batch.nnz, generator=torch.Generator().manual_seed(0)) >= 0.5
    rows = batch.row_ids()[kept]
    indices, coef = batch.indices[kept], batch.values[kept]
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.bincount(rows, minlength=N_USERS).cumsum(0)])

    def cpp():
        return csr_transpose(indptr, indices, coef, N_ITEMS)

    def torch_sort():
        row_ids = torch.repeat_interleave(torch.arange(N_USERS), indptr[1:] - indptr[:-1], output_size=indices.numel())
        order = torch.argsort(indices, stable=True)
        counts = torch.bincount(indices[order], minlength=N_ITEMS)
        return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]), row_ids[order], coef[order]

    for a, b in zip(cpp(), torch_sort(), strict=True):
        assert torch.equal(a, b)
    compare_speed(cpp, torch_sort, FLOOR, rounds=20, warmup=3)
