"""The paper's preprocessing (Liang et al. 2018): drop users (and optionally items) with too few
interactions."""
from __future__ import annotations

import numpy as np

from .errors import DataError
from .interactions import Interactions

def preprocess(interactions: Interactions, *, min_items_per_user: int = 5,
               min_users_per_item: int = 0) -> Interactions:
    """The paper's preprocessing (Liang et al.): optionally drop items with fewer than
    min_users_per_item users, then drop users with fewer than min_items_per_user items.
    Items left with no user are dropped too; restricting items to those seen in training is
    done by the split. Raises DataError when nothing is left."""
    if min_items_per_user < 0 or min_users_per_item < 0:
        raise ValueError("min_items_per_user and min_users_per_item must be >= 0")
    m = interactions.matrix
    structure = m.copy()
    structure.data = (structure.data != 0).astype(np.float32)
    cols = np.arange(m.shape[1])
    if min_users_per_item > 0:
        item_counts = np.asarray(structure.sum(axis=0)).ravel()
        cols = np.flatnonzero(item_counts >= min_users_per_item)
        structure = structure[:, cols]
    user_counts = np.asarray(structure.sum(axis=1)).ravel()
    rows = np.flatnonzero(user_counts >= min_items_per_user)
    if rows.size == 0:
        raise DataError(
            f"empty dataset after preprocessing: no user has >= {min_items_per_user} items "
            f"({interactions.n_users} users, at most {int(user_counts.max(initial=0))} items each)"
        )
    kept_items = np.asarray(structure[rows].sum(axis=0)).ravel() > 0
    cols = cols[kept_items]
    return interactions.subset(rows=rows, cols=cols)

