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
numpy generator, the configuration) is JSON in `train_state.json` inside the subfolder. DCP unpickles
its `.metadata` file; before DCP reads it, `read_metadata` unpickles it with an allow-list of the
classes DCP's metadata is made of, so a crafted checkpoint cannot run code.
"""
from __future__ import annotations

import json
import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

from ..atomic import atomic_write_text
from ..model import RecVAE
from ..optim import RowSparseAdam
from .mesh import ItemLayout
from .model import SHARDED_KEYS, ShardedRecVAE

POINTER_NAME = "LATEST"
TRAIN_STATE_NAME = "train_state.json"
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
_STEP_FOLDER = re.compile(r"step-\d{6}")


_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
                 "ChunkStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _METADATA_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def read_metadata(path) -> Metadata:
    """The DCP metadata of checkpoint folder `path`, unpickled with an allow-list of DCP's own classes;
    a file holding anything else is refused with an error naming it."""
    metadata_file = Path(path) / ".metadata"
    try:
        with open(metadata_file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as exc:
        raise ValueError(f"{metadata_file} is not a torch.distributed.checkpoint metadata file: {exc}") from None
    if not isinstance(metadata, Metadata):
        raise ValueError(f"{metadata_file} is not a torch.distributed.checkpoint metadata file")
    return metadata


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
    saved_keys = read_metadata(path).state_dict_metadata
    _add_optimizer_state(model, optimizers, saved_keys)
    with_best = with_best and "best.decoder.weight" in saved_keys  # a run without validation has none
    best = {name: torch.empty_like(p) for name, (p, _) in _model_entries(model).items()} if with_best else None
    rng_states = {k: v for k, v in _rng_states(model).items() if k in saved_keys} if with_rng else None
    state = checkpoint_tensors(model, optimizers, best, rng_states)
    dcp.load(state, checkpoint_id=path)  # fills every tensor, and every ShardedTensor's rows, in place
    _int_steps_back(optimizers, model, state)
    if with_rng and "rng" in state:
        torch.set_rng_state(state["rng"])
        if "rng.cuda" in state:
            torch.cuda.set_rng_state(state["rng.cuda"], model.decoder.weight.device)
    return json.loads((path / TRAIN_STATE_NAME).read_text(encoding="utf-8")), best


def load_into_recvae(path, best: bool = False) -> RecVAE:
    """A single-device RecVAE (CPU) from a checkpoint folder, without a process group: the layout it
    was written with does not matter. best=True takes the best parameters instead of the last."""
    path = Path(path)
    metadata = read_metadata(path)
    prefix = "best." if best else "model."
    shapes = {k[len(prefix):]: md.size for k, md in metadata.state_dict_metadata.items() if k.startswith(prefix)}
    if "decoder.weight" not in shapes or "encoder.fc1.weight_t" not in shapes:
        raise ValueError(f"{path} holds no {'best ' if best else ''}RecVAE parameters")
    n_items, latent_dim = shapes["decoder.weight"]
    hidden_dim = shapes["encoder.fc1.weight_t"][1]
    model = RecVAE(hidden_dim, latent_dim, n_items)
    dtype = metadata.state_dict_metadata[prefix + "decoder.weight"].properties.dtype
    model = model.to(dtype)
    state = {prefix + name: p.detach() for name, p in model.named_parameters()}
    with warnings.catch_warnings():  # DCP warns that it loads in one process: that is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, checkpoint_id=path, no_dist=True)
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
