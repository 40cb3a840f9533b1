"""Checkpoints of a ShardedRecVAE through torch.distributed.checkpoint (DCP).

A checkpoint folder holds numbered DCP checkpoints (`step-000003/`, each rank writing its own rows of
the sharded parameters and of their Adam moments; replicated tensors are written once) and a pointer
file `LATEST` naming the newest complete one. A save writes a new subfolder, waits for every rank,
and only then switches `LATEST` atomically: a crash mid-save leaves the previous checkpoint in use.

Sharded tensors are saved as ShardedTensor with their global shape and row offsets, so a checkpoint
loads into any other number of item shards (DCP reads the overlapping rows), and, without a process
group, into a single-device RecVAE. (ShardedTensor, not DTensor: DTensor's Shard(0) fixes the rows per
rank to ceil(I / S), which can leave a rank empty, e.g. 9 items over 4 ranks as 3, 3, 3, 0, where
ShardedTensor takes any row ranges. torch announces ShardedTensor's deprecation with a FutureWarning.)
The training state that is not a tensor (epoch, history, the
numpy generator, the configuration) is JSON in `train_state.json` inside the subfolder.

Loading admits tensors only, so a crafted checkpoint cannot run code: the `.metadata` file (a pickle)
is unpickled once, by `read_metadata`, with an allow-list of the classes DCP's tensor metadata is made
of, and must describe tensors alone, each stored in one of the checkpoint's own `.distcp` files; DCP is
handed that checked metadata (it never unpickles the file itself) through a reader that refuses any
read but a tensor's. (DCP's other kind of entry, bytes, is loaded with an unrestricted torch.load.)
"""
from __future__ import annotations

import json
import math
import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta, TensorStorageMetadata,
)
from torch.distributed.checkpoint.metadata import TensorProperties as DCPTensorProperties
from torch.distributed.checkpoint.planner import LoadItemType
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

from ..atomic import atomic_write_text
from ..data.ids import read_json
from ..model import RecVAE
from ..optim import RowSparseAdam
from .mesh import ItemLayout
from .model import SHARDED_KEYS, ShardedRecVAE

POINTER_NAME = "LATEST"
TRAIN_STATE_NAME = "train_state.json"
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
_STEP_FOLDER = re.compile(r"step-\d{6}")


# What DCP's metadata of tensors is made of; BytesStorageMetadata (a non-tensor entry) is left out.
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "MetadataIndex",
                 "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}
_DATA_FILE = re.compile(r"__\d+_\d+\.distcp")  # the files DCP's FileSystemWriter names, in the folder itself


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _METADATA_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's tensor metadata")


def _is_size(value) -> bool:
    return isinstance(value, torch.Size) and all(isinstance(n, int) and n >= 0 for n in value)


def _chunks_problem(size: torch.Size, chunks: list) -> str | None:
    """Why `chunks` do not tile a tensor of `size` exactly once (None: they do); DCP would leave the
    part of a tensor that no chunk covers as it was."""
    boxes = [(tuple(c.offsets), tuple(c.sizes)) for c in chunks]
    for offsets, sizes in boxes:
        if any(o + n > s for o, n, s in zip(offsets, sizes, size)):
            return "a chunk lies outside the tensor"
    for j, (a_off, a_size) in enumerate(boxes):
        for b_off, b_size in boxes[:j]:
            if all(ao < bo + bn and bo < ao + an for ao, an, bo, bn in zip(a_off, a_size, b_off, b_size)):
                return "two chunks overlap"
    if sum(math.prod(sizes) for _, sizes in boxes) != math.prod(size):
        return "its chunks do not cover the tensor"
    return None


def _metadata_problem(metadata) -> str | None:
    """Why `metadata` is not DCP metadata of tensors stored in the checkpoint's own files (None: it is)."""
    if not isinstance(metadata, Metadata):
        return f"it holds a {type(metadata).__name__}, not DCP's Metadata"
    entries, storage = metadata.state_dict_metadata, metadata.storage_data
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        return "its entries or their storage are not tables"
    for key, entry in entries.items():
        if not isinstance(key, str) or not isinstance(entry, TensorStorageMetadata):
            return f"entry {key!r} is a {type(entry).__name__}, not a tensor (only tensors are loaded)"
        if not (_is_size(entry.size) and isinstance(entry.properties, DCPTensorProperties)
                and isinstance(entry.properties.dtype, torch.dtype) and isinstance(entry.chunks, list)
                and all(isinstance(c, ChunkStorageMetadata) and _is_size(c.offsets) and _is_size(c.sizes)
                        and len(c.offsets) == len(c.sizes) == len(entry.size) for c in entry.chunks)):
            return f"entry {key!r} has a malformed size, dtype or chunk list"
        problem = _chunks_problem(entry.size, entry.chunks)
        if problem is not None:
            return f"entry {key!r}: {problem}"
        if not all(MetadataIndex(key, c.offsets) in storage for c in entry.chunks):
            return f"entry {key!r} has a chunk stored nowhere"
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            return f"a storage record is a {type(info).__name__}, not a tensor's place in a file"
        if index.fqn not in entries:
            return f"storage record {index.fqn!r} belongs to no entry"
        if not (isinstance(info.relative_path, str) and _DATA_FILE.fullmatch(info.relative_path)):
            return f"entry {index.fqn!r} is stored in {info.relative_path!r}, not in a data file of this checkpoint"
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (info.offset, info.length)):
            return f"entry {index.fqn!r} has a malformed offset or length"
        if info.transform_descriptors:
            return f"entry {index.fqn!r} asks for transforms ({info.transform_descriptors!r:.80}), which are not used here"
    if metadata.storage_meta is not None and not isinstance(metadata.storage_meta, StorageMeta):
        return "its storage description is malformed"
    return None


def read_metadata(path) -> Metadata:
    """The DCP metadata of checkpoint folder `path`, unpickled with an allow-list of DCP's own classes
    and checked to describe tensors only, each in one of the folder's data files; anything else is
    refused with a ValueError naming the file."""
    metadata_file = Path(path) / ".metadata"
    try:
        with open(metadata_file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, KeyError, IndexError,
            MemoryError, RecursionError) as exc:
        raise ValueError(f"{metadata_file} is not a torch.distributed.checkpoint metadata file: "
                         f"{' '.join(str(exc).split())[:200]}") from None
    problem = _metadata_problem(metadata)
    if problem is not None:
        raise ValueError(f"{metadata_file} is not a torch.distributed.checkpoint metadata file of tensors: {problem}")
    return metadata


class _TensorReader(FileSystemReader):
    """DCP's file reader for tensors only: it hands DCP the metadata read_metadata checked (DCP's own
    reader would unpickle the file without restriction) and refuses any read that is not a tensor's."""

    def __init__(self, path, metadata: Metadata):
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self) -> Metadata:  # no **kwargs: DCP then never falls back to per-rank metadata files
        if self._metadata.storage_meta is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata

    def read_data(self, plan, planner):
        for item in plan.items:
            if item.type != LoadItemType.TENSOR:
                raise ValueError(f"{self.path}: entry {item.storage_index.fqn!r} is not a tensor; only tensors are loaded")
        return super().read_data(plan, planner)


def _load_tensors(state: dict, path: Path, metadata: Metadata, **kwargs) -> None:
    """dcp.load of the tensors of `state` from checkpoint folder `path`, whose checked metadata is given."""
    try:
        dcp.load(state, storage_reader=_TensorReader(path, metadata), **kwargs)
    except (CheckpointException, ValueError, RuntimeError, AssertionError, KeyError, OSError) as exc:
        # CheckpointException (a BaseException) carries each failing rank's traceback: its first error suffices
        failures = getattr(exc, "failures", None)
        cause = next(iter(failures.values()))[0] if failures else exc
        detail = " ".join(str(cause).split())[:200] or type(cause).__name__
        raise ValueError(f"{path} does not hold this model's tensors ({detail})") from None


def _sharded(rows: torch.Tensor, layout: ItemLayout) -> ShardedTensor:
    """This rank's rows [lo, hi) of an n_items-row tensor, as a ShardedTensor over the item group."""
    rest = list(rows.shape[1:])
    device = rows.device
    shards_metadata = [
        ShardMetadata(
            shard_offsets=[lo] + [0] * len(rest),
            shard_sizes=[hi - lo] + rest,
            placement=f"rank:{dist.get_global_rank(layout.items_group, s)}/{device}",
        )
        for s, (lo, hi) in enumerate(layout.bounds)
    ]
    metadata = ShardedTensorMetadata(
        shards_metadata=shards_metadata,
        size=torch.Size([layout.n_items] + rest),
        tensor_properties=TensorProperties(dtype=rows.dtype, layout=torch.strided, requires_grad=False),
    )
    local = Shard(rows.detach(), shards_metadata[layout.shard])
    return ShardedTensor._init_from_local_shards_and_global_metadata([local], metadata, layout.items_group)


def _model_entries(model: ShardedRecVAE) -> dict[str, tuple[torch.Tensor, bool]]:
    """parameter name (RecVAE's, e.g. encoder.fc1.weight_t) -> (tensor, sharded by item rows)."""
    shard_ids = {id(t) for t in model.shard_tensors().values()}
    return {name: (p, id(p) in shard_ids) for name, p in model.named_parameters()}


def _add_optimizer_state(model: ShardedRecVAE, optimizers, saved_keys) -> None:
    """Give each parameter whose Adam state the checkpoint holds a zero state, for DCP to load into
    (RowSparseAdam counts its steps in an int, torch.optim.Adam in a tensor)."""
    names = {id(p): n for n, (p, _) in _model_entries(model).items()}
    for j, opt in enumerate(optimizers):
        fused = bool(opt.defaults.get("fused"))
        for group in opt.param_groups:
            for p in group["params"]:
                if f"adam{j}.{names[id(p)]}.step" in saved_keys and not opt.state[p]:
                    step = 0 if isinstance(opt, RowSparseAdam) else torch.zeros(
                        (), dtype=torch.float32, device=p.device if fused else "cpu")
                    opt.state[p] = {
                        "step": step,
                        **{m: torch.zeros_like(p, memory_format=torch.preserve_format) for m in ADAM_MOMENTS},
                    }


def _int_steps_back(optimizers, model: ShardedRecVAE, loaded: dict) -> None:
    """After a load: the int step counts (RowSparseAdam's), which DCP loaded as tensors, back as ints."""
    names = {id(p): n for n, (p, _) in _model_entries(model).items()}
    for j, opt in enumerate(optimizers):
        for p, state in opt.state.items():
            if isinstance(state.get("step"), int):
                state["step"] = int(loaded[f"adam{j}.{names[id(p)]}.step"])


def _rng_states(model: ShardedRecVAE) -> dict[str, torch.Tensor]:
    """torch's generators that training draws from: the CPU one, and the model's GPU's (its dropout
    masks and ε are drawn there). Each is the same on every rank (see .training)."""
    states = {"rng": torch.get_rng_state()}
    device = model.decoder.weight.device
    if device.type == "cuda":
        states["rng.cuda"] = torch.cuda.get_rng_state(device)
    return states


def checkpoint_tensors(model: ShardedRecVAE, optimizers=(), best_state: dict | None = None,
                       rng_states: dict[str, torch.Tensor] | None = None) -> dict:
    """The flat DCP state_dict: model.<name>, adam<j>.<name>.<moment|step>, best.<name>, rng[.cuda]."""
    layout = model.layout
    wrap = (lambda t, sharded: _sharded(t, layout) if sharded and layout.n_shards > 1 else t)
    out = {}
    entries = _model_entries(model)
    for name, (param, sharded) in entries.items():
        out[f"model.{name}"] = wrap(param, sharded)
        if best_state is not None:
            out[f"best.{name}"] = wrap(best_state[name], sharded)
    for j, opt in enumerate(optimizers):
        names = {id(p): n for n, (p, _) in entries.items()}
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state[p]
                if not state:
                    continue
                name = names[id(p)]
                step = state["step"]  # an int (RowSparseAdam) is saved as a tensor
                out[f"adam{j}.{name}.step"] = torch.tensor(step) if isinstance(step, int) else step
                for m in ADAM_MOMENTS:
                    out[f"adam{j}.{name}.{m}"] = wrap(state[m], entries[name][1])
    out.update(rng_states or {})
    return out


def latest_checkpoint(folder) -> Path | None:
    """The newest complete checkpoint in `folder` (None if there is none)."""
    pointer = Path(folder) / POINTER_NAME
    if not pointer.exists():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    if not _STEP_FOLDER.fullmatch(name):
        raise ValueError(f"{pointer} names {name!r}, not a checkpoint folder of the form step-NNNNNN")
    path = Path(folder) / name
    if not (path / ".metadata").exists() or not (path / TRAIN_STATE_NAME).exists():
        raise FileNotFoundError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


def save_checkpoint(folder, step: int, model: ShardedRecVAE, optimizers=(), train_state: dict | None = None,
                    best_state: dict | None = None) -> Path:
    """Every rank calls this. Writes folder/step-<step>/ and then points LATEST at it; the previous
    checkpoint is deleted only after the switch."""
    folder = Path(folder)
    target = folder / f"step-{step:06d}"
    previous = latest_checkpoint(folder) if dist.get_rank() == 0 and folder.exists() else None
    if dist.get_rank() == 0:
        if target.exists():  # left by a crash during an earlier attempt at this step; never LATEST
            shutil.rmtree(target)
        target.mkdir(parents=True)
    dist.barrier()
    state = checkpoint_tensors(model, optimizers, best_state, _rng_states(model))
    dcp.save(state, checkpoint_id=target)
    if dist.get_rank() == 0:
        atomic_write_text(target / TRAIN_STATE_NAME, json.dumps(train_state or {}))
    dist.barrier()  # every rank's shard is on disk
    if dist.get_rank() == 0:
        atomic_write_text(folder / POINTER_NAME, target.name + "\n")
        if previous is not None and previous != target:
            shutil.rmtree(previous)
    dist.barrier()
    return target


def load_checkpoint(path, model: ShardedRecVAE, optimizers=(), with_best: bool = False,
                    with_rng: bool = False) -> tuple[dict, dict | None]:
    """Load a checkpoint folder (step-NNNNNN, e.g. latest_checkpoint(...)) into `model` (any number of
    item shards) and `optimizers`; with_rng restores torch's generators (the CPU one, and the GPU one
    when both the checkpoint and the model are on CUDA). Returns (the JSON training state, the best
    parameters by name, or None without with_best or when the checkpoint has none)."""
    path = Path(path)
    metadata = read_metadata(path)
    saved_keys = metadata.state_dict_metadata
    _add_optimizer_state(model, optimizers, saved_keys)
    with_best = with_best and "best.decoder.weight" in saved_keys  # a run without validation has none
    best = {name: torch.empty_like(p) for name, (p, _) in _model_entries(model).items()} if with_best else None
    rng_states = {k: v for k, v in _rng_states(model).items() if k in saved_keys} if with_rng else None
    state = checkpoint_tensors(model, optimizers, best, rng_states)
    _load_tensors(state, path, metadata)  # fills every tensor, and every ShardedTensor's rows, in place
    _int_steps_back(optimizers, model, state)
    if with_rng and "rng" in state:
        torch.set_rng_state(state["rng"])
        if "rng.cuda" in state:
            torch.cuda.set_rng_state(state["rng.cuda"], model.decoder.weight.device)
    return read_json(path / TRAIN_STATE_NAME), best


def load_into_recvae(path, best: bool = False) -> RecVAE:
    """A single-device RecVAE (CPU) from a checkpoint folder, without a process group: the layout it
    was written with does not matter. best=True takes the best parameters instead of the last."""
    path = Path(path)
    metadata = read_metadata(path)
    prefix = "best." if best else "model."
    shapes = {k[len(prefix):]: md.size for k, md in metadata.state_dict_metadata.items() if k.startswith(prefix)}
    if "decoder.weight" not in shapes or "encoder.fc1.weight_t" not in shapes:
        raise ValueError(f"{path} holds no {'best ' if best else ''}RecVAE parameters")
    dtype = metadata.state_dict_metadata[prefix + "decoder.weight"].properties.dtype
    if len(shapes["decoder.weight"]) != 2 or len(shapes["encoder.fc1.weight_t"]) != 2 or not dtype.is_floating_point:
        raise ValueError(f"{path} holds no {'best ' if best else ''}RecVAE parameters (malformed shapes or dtype)")
    n_items, latent_dim = shapes["decoder.weight"]
    hidden_dim = shapes["encoder.fc1.weight_t"][1]
    model = RecVAE(hidden_dim, latent_dim, n_items)
    model = model.to(dtype)
    state = {prefix + name: p.detach() for name, p in model.named_parameters()}
    with warnings.catch_warnings():  # DCP warns that it loads in one process: that is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        _load_tensors(state, path, metadata, no_dist=True)
    model.eval()
    return model


def gather_full_state_dict(model: ShardedRecVAE) -> dict | None:
    """The authors'-format state_dict of the whole model (CPU tensors) on global rank 0, None on the
    other ranks: each item group gathers its rows to its first rank. Every rank calls this; the caller
    checks that n_items × (2·H + K + 1) numbers fit in host memory."""
    layout = model.layout
    keep = not dist.is_initialized() or dist.get_rank() == 0
    out = {key: value.detach().cpu().clone() for key, value in model.replicated_tensors().items()} if keep else None
    width = max(hi - lo for lo, hi in layout.bounds)
    for key, rows in model.shard_tensors().items():
        rows = rows.detach()
        if layout.n_shards > 1:
            # gather needs one size: every shard padded to the largest
            padded = rows.new_zeros((width,) + tuple(rows.shape[1:]))
            padded[: rows.shape[0]] = rows
            gathered = [torch.empty_like(padded) for _ in layout.bounds] if layout.shard == 0 else None
            dist.gather(padded, gathered, group=layout.items_group, group_dst=0)
            if keep:
                rows = torch.cat([g[: hi - lo] for g, (lo, hi) in zip(gathered, layout.bounds)])
        if keep:
            rows = rows.cpu()
            out[key] = rows.t().contiguous() if SHARDED_KEYS[key] == 1 else rows.clone()
    return out
