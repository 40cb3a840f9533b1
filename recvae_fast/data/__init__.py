"""Data: interaction files, the paper's preprocessing and strong-generalisation split, the
embedded synthetic dataset, and the split's files in a run folder.

Modules, top-down:
- `ids`: original user/item ids and `IdMap`, the one map between ids and matrix positions;
- `npz`: CSR matrices in .npz archives, written atomically and validated on reading (no pickle);
- `interactions`: `Interactions`, a CSR users × items matrix with its ids;
- `layout`: a text file's separator, header and user/item/rating columns, detected;
- `readers`: `load_interactions` for CSV/TSV, MovieLens, RecBole .inter and Parquet files (pyarrow),
  and `has_rating_column`;
- `preprocess`: drop users (and items) with too few interactions;
- `split`: `split_strong_generalization` and `Split`, with `Split.save` / `Split.load` (a run
  folder's split.npz, items.json, users.json) and `Split.fingerprint`; `cross_validation_fold`, a
  fold of a split's non-test users (the tuner's final selection);
- `synthetic`: `synthetic_dataset`.

Every problem with the input raises `DataError` (a ValueError) with one line that names it.
"""
from .errors import DataError
from .ids import MAX_ID_LENGTH, IdMap
from .interactions import Interactions, load_id_maps, popularity_scores
from .preprocess import preprocess
from .readers import has_rating_column, load_interactions
from .split import Fold, Split, cross_validation_fold, split_strong_generalization
from .synthetic import synthetic_dataset

__all__ = [
    "DataError",
    "Fold",
    "IdMap",
    "Interactions",
    "MAX_ID_LENGTH",
    "Split",
    "cross_validation_fold",
    "has_rating_column",
    "load_id_maps",
    "load_interactions",
    "popularity_scores",
    "preprocess",
    "split_strong_generalization",
    "synthetic_dataset",
]
