"""Run folders: their layout, the writers' lock, loading without unpickling, and fingerprints.

A run folder (written by `recvae-fast train` or `fit(checkpoint_dir=...)`) guarantees:
- every file is written atomically (recvae_fast.atomic): a kill leaves its old or its new version;
- one writer at a time: writers hold an exclusive lock (fcntl.flock on `.lock`, which records the
  holder's pid and host); a second writer is refused with an error naming the holder; the holder
  removes the temporaries an interrupted writer left; a `.lock` that is not a plain file of its own
  (a symlink, a hard link, a FIFO or a device) is refused, never written through;
- reading never unpickles arbitrary objects: .pt files are read with torch.load(weights_only=True),
  which builds only tensors and plain containers; anything else is refused as a corrupt file.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .atomic import atomic_write, atomic_write_text, remove_stale_temporaries
from .data.ids import read_json  # noqa: F401  (JSON of a run folder: DataError naming the file)
from .data.split import ITEMS_NAME, SPLIT_NAME, USERS_NAME  # noqa: F401  (the split's files, Split.save)
from .hashing import Digest

MODEL_NAME = "model.pt"  # the best model, a state_dict in the authors' format
CHECKPOINT_NAME = "checkpoint.pt"  # everything `--resume` needs, with the epochs' history
# Also the split's files, written and read by data.Split.save / Split.load: split.npz (the train,
# validation and test matrices), items.json (column -> original item id), users.json (row -> user id).
RUN_NAME = "run.json"  # data source and options, split fingerprint and hyperparameters of the run
RUN_FORMAT = 1  # run.json's "format"
LOG_NAME = "metrics.jsonl"  # one line per epoch, regenerated from the checkpoint's history
SUMMARY_NAME = "summary.json"  # test metrics of the finished run
LOCK_NAME = ".lock"


class RunFolderError(ValueError):
    """A run folder that cannot be used: a missing, corrupt or incompatible file."""


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder's writer lock."""


# Locks this process holds: folder -> [fd, depth]. flock conflicts between two open() of the same
# file even within one process, so a nested writer (the CLI calling fit) reuses the held lock.
_HELD: dict[Path, list] = {}


_HOLDER_BYTES = 128  # the holder line's width in the lock file


def _open_lock_file(path: Path) -> int:
    """A descriptor of the lock file `path`, created if missing. Only a regular file with no other
    name is used: never a symlink (O_NOFOLLOW), a hard link to another file, a FIFO or a device,
    since the holder line is written into it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RunFolderError(f"{path} is a symbolic link; the run folder's lock must be a plain file "
                                 "(remove it)") from None
        raise RunFolderError(f"cannot open the run folder's lock {path}: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        what = "has other names (a hard link)" if stat.S_ISREG(info.st_mode) else "is not a regular file"
        raise RunFolderError(f"{path} {what}; the run folder's lock must be a plain file of its own (remove it)")
    return fd


class RunLock:
    """`with RunLock(folder):` exclusive writer access to `folder` (created if missing).

    Non-blocking by default: raises RunFolderBusy naming the holder's pid and host; with wait_s,
    retries for up to that many seconds first. The first acquisition in this process removes stale
    temporaries left by an interrupted writer.
    """

    def __init__(self, folder: str | os.PathLike, wait_s: float = 0.0):
        self.folder = Path(folder)
        self.wait_s = wait_s

    def __enter__(self) -> "RunLock":
        if self.folder.exists() and not self.folder.is_dir():
            raise RunFolderError(f"{self.folder} is not a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        key = self.folder.resolve()
        if key in _HELD:
            _HELD[key][1] += 1
            return self
        fd = _open_lock_file(self.folder / LOCK_NAME)
        deadline = time.monotonic() + self.wait_s
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(0.2)
        except BlockingIOError:
            holder = os.pread(fd, _HOLDER_BYTES, 0).decode("utf-8", "replace").strip().split("\n")[0].strip()
            os.close(fd)
            raise RunFolderBusy(f"{self.folder} is being written by another process ({holder or 'unknown process'}); "
                                "wait for it to finish or use another folder") from None
        except BaseException:
            os.close(fd)
            raise
        # Holder information only (the lock is the flock, not this content): a fixed-width line written
        # over the start of the file, which is never truncated.
        holder = f"pid {os.getpid()} on host {socket.gethostname()}"[: _HOLDER_BYTES - 1]
        os.pwrite(fd, (holder.ljust(_HOLDER_BYTES - 1) + "\n").encode(), 0)
        _HELD[key] = [fd, 1]
        remove_stale_temporaries(self.folder)
        return self

    def __exit__(self, *exc) -> None:
        key = self.folder.resolve()
        _HELD[key][1] -= 1
        if _HELD[key][1] == 0:
            fd = _HELD.pop(key)[0]
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def save_tensors(obj, path: str | os.PathLike) -> None:
    """torch.save through recvae_fast.atomic: a kill leaves the old file or the new one. `obj` must
    hold only tensors and plain containers, so that load_tensors can read it back."""
    import torch

    def write(f):
        try:
            torch.save(obj, f)
        except RuntimeError as exc:  # how torch.save reports a failed write (e.g. a full disk)
            detail = " ".join(str(exc).split())[:200]
            raise OSError(f"cannot write {path}: the write failed, is the disk full? ({detail})") from None

    atomic_write(path, write)


def load_tensors(path: str | os.PathLike, map_location=None):
    """torch.load(weights_only=True): tensors and plain containers only, never arbitrary objects.
    A missing file raises FileNotFoundError; any other failure (a pickle payload, a truncated or
    foreign file) raises RunFolderError naming the file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        with warnings.catch_warnings():  # torch warns about a foreign file's pickle protocol: the error below says it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # the file is untrusted: every way it can fail to load is "corrupt"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunFolderError(f"{path} is corrupt, truncated or not a safe tensor file "
                             f"(refused to load: {first_line[:200]})") from None


def check_regular_files(folder: str | os.PathLike, names) -> None:
    """A RunFolderError for the first of the run files `names` in `folder` that exists but is not a
    regular file (a folder, FIFO or device, or a link to one): it could be neither read nor replaced."""
    for name in names:
        path = Path(folder) / name
        if path.exists() and not path.is_file():
            raise RunFolderError(f"{path} is not a regular file (a folder, FIFO or device); remove it")


def write_json(path: str | os.PathLike, obj, indent: int | None = None) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=True))


def fingerprint(*arrays) -> str:
    """sha256 over the given matrices and arrays (sparse: shape, indptr, indices, data; numpy:
    dtype, shape, bytes; anything else: its JSON). Equal fingerprints mean the same data."""
    digest = Digest()
    for a in arrays:
        if a is None:
            digest.raw(b"none|")
        elif sp.issparse(a):
            m = sp.csr_matrix(a)
            m.sort_indices()
            digest.raw(f"csr{m.shape}|".encode())
            for part in (m.indptr.astype(np.int64), m.indices.astype(np.int64), m.data.astype(np.float32)):
                digest.raw(np.ascontiguousarray(part).tobytes())
        elif isinstance(a, np.ndarray) and a.dtype != object:
            digest.raw(f"{a.dtype.str}{a.shape}|".encode())
            digest.raw(np.ascontiguousarray(a).tobytes())
        else:
            digest.raw(json.dumps(np.asarray(a).tolist() if isinstance(a, np.ndarray) else a).encode())
        digest.raw(b"#")
    return digest.hexdigest()
