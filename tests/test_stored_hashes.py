"""Every hash the package stores, pinned on fixed input: run folders (run.json's split_fingerprint,
the checkpoint's data_fingerprint, split.npz's ids_sha256) and tuning studies written before must
keep loading, so these values may never change."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from recvae_fast.data import Split
from recvae_fast.runfolder import fingerprint

MATRIX = sp.csr_matrix(np.array([[1, 0, 2, 0], [0, 3, 0, 0], [4, 0, 0, 5], [0, 0, 6, 0]], dtype=np.float32))


def fixed_split() -> Split:
    rows = lambda *r: sp.csr_matrix(np.array(r, dtype=np.float32))  # noqa: E731
    return Split(train=MATRIX, valid_in=rows([1, 0, 0, 1]), valid_out=rows([0, 1, 0, 0]),
                 test_in=rows([0, 0, 1, 0]), test_out=rows([0, 0, 0, 2.5]),
                 item_ids=np.array(["a", "b", "c", "d"]), train_user_ids=np.array([12, 13, 14, 15]),
                 valid_user_ids=np.array([10]), test_user_ids=np.array([11]))


def test_split_fingerprint_is_pinned():
    assert fixed_split().fingerprint() == "fe4847a51d9f58b7"


def test_split_ids_hash_is_pinned(tmp_path):
    fixed_split().save(tmp_path)
    assert (tmp_path / "items.json").read_text() == '["a", "b", "c", "d"]'
    assert (tmp_path / "users.json").read_text() == '{"train": [12, 13, 14, 15], "valid": [10], "test": [11]}'
    with np.load(tmp_path / "split.npz", allow_pickle=False) as z:
        assert z["ids_sha256"].tobytes().hex() == "e5c86bfe8d6980686779e5453a8c687cb18d8f275fe6281c162265d4f41b082a"


def test_data_fingerprint_is_pinned():
    parts = (MATRIX, None, np.arange(5, dtype=np.int32), np.array([1.5, 2.5]), {"a": 1}, [1, "x"])
    assert fingerprint(*parts) == "885fa68ee82e6c3b33f9ad172f9fab4d6fef8c280aa99e1d60bcda20430df72b"
    # a CSR matrix with unsorted columns hashes as its sorted form
    unsorted = sp.csr_matrix((np.array([2, 1], dtype=np.float32), np.array([2, 0]), np.array([0, 2])), shape=(1, 4))
    assert fingerprint(unsorted) == fingerprint(sp.csr_matrix(unsorted.toarray()))
    assert fingerprint(MATRIX) != fingerprint(MATRIX * 2)
