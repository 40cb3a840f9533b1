"""Random user × item batches for the benches (binary interactions, no duplicate items per user)."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def user_item_batch(n_users: int, n_items: int, items_per_user: int, seed: int = 0, vary: bool = False):
    """A CSR matrix with items_per_user distinct items per user, or, with vary, a count drawn
    uniformly from [items_per_user / 2, 3·items_per_user / 2) per user."""
    rng = np.random.default_rng(seed)
    if vary:
        counts = rng.integers(items_per_user // 2, 3 * items_per_user // 2, n_users)
    else:
        counts = np.full(n_users, items_per_user)
    rows = np.repeat(np.arange(n_users), counts)
    cols = np.concatenate([rng.choice(n_items, c, replace=False) for c in counts])
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_users, n_items))
