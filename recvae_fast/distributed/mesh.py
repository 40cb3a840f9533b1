"""The ("data", "items") device mesh, item shard bounds, and collectives with the right autograd.

Rank r of the "items" dimension owns items [lo_r, hi_r) of the catalogue; the "data" dimension
splits each global batch of users. Everything downstream of the three collectives below is
computed identically by every rank of an item group (same batch, same replicated weights, same
random draws), which is what makes their backward passes correct:

- `sum_over_shards`: forward all-reduce (sum); backward identity. Each rank's partial feeds a sum
  that every rank then uses the same way, so the gradient of the sum is each partial's gradient.
- `grad_summed_over_shards`: forward identity; backward all-reduce (sum). A replicated tensor fed
  into a per-shard computation: its gradient is the sum of the shards' contributions.
- `gather_over_shards`: forward all-gather (S × ...); backward keeps this rank's slice of the
  gradient (every rank holds the same full gradient).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIM_NAMES = ("data", "items")


def shard_bounds(n_items: int, n_shards: int) -> list[tuple[int, int]]:
    """[lo, hi) of each shard: contiguous, sizes differing by at most one (the first I mod S shards
    hold one more item)."""
    if n_shards <= 0:
        raise ValueError(f"the number of item shards must be positive, got {n_shards}")
    if n_items < n_shards:
        raise ValueError(f"{n_items} items cannot be split into {n_shards} non-empty shards")
    base, extra = divmod(n_items, n_shards)
    bounds, lo = [], 0
    for s in range(n_shards):
        hi = lo + base + (1 if s < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


@dataclass(frozen=True)
class ItemLayout:
    """Where this rank sits: its item shard [lo, hi) of n_items and its place in the data dimension.
    Without a process group (items_group None) it is the one-device layout: one shard, one replica."""

    n_items: int
    n_shards: int
    shard: int
    data_size: int
    data_rank: int
    items_group: dist.ProcessGroup | None = None
    data_group: dist.ProcessGroup | None = None

    @property
    def bounds(self) -> list[tuple[int, int]]:
        return shard_bounds(self.n_items, self.n_shards)

    @property
    def lo(self) -> int:
        return self.bounds[self.shard][0]

    @property
    def hi(self) -> int:
        return self.bounds[self.shard][1]

    @property
    def n_local(self) -> int:
        return self.hi - self.lo


def make_item_mesh(item_shards: int, device_type: str = "cpu") -> DeviceMesh:
    """A 2-D mesh ("data", "items") over the initialised default process group: world size W must be
    a multiple of item_shards; W / item_shards is the data-parallel size."""
    if not dist.is_initialized():
        raise RuntimeError("item sharding needs an initialised process group (torchrun, or dist.init_process_group)")
    world = dist.get_world_size()
    if isinstance(item_shards, bool) or not isinstance(item_shards, int) or item_shards <= 0 or world % item_shards:
        raise ValueError(
            f"item_shards={item_shards!r} must be a positive divisor of the number of processes ({world}); "
            f"processes / item_shards is the data-parallel size"
        )
    return init_device_mesh(device_type, (world // item_shards, item_shards), mesh_dim_names=MESH_DIM_NAMES)


def item_layout(mesh: DeviceMesh | None, n_items: int) -> ItemLayout:
    """This rank's ItemLayout on `mesh` (None: the one-device layout)."""
    if mesh is None:
        shard_bounds(n_items, 1)
        return ItemLayout(n_items, 1, 0, 1, 0)
    n_shards = mesh.size(mesh_dim=MESH_DIM_NAMES.index("items"))
    shard_bounds(n_items, n_shards)  # validates
    return ItemLayout(
        n_items=n_items,
        n_shards=n_shards,
        shard=mesh.get_local_rank("items"),
        data_size=mesh.size(mesh_dim=MESH_DIM_NAMES.index("data")),
        data_rank=mesh.get_local_rank("data"),
        items_group=mesh.get_group("items"),
        data_group=mesh.get_group("data"),
    )


def collective_device() -> torch.device:
    """Where a tensor made only for a collective must live: the current GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _SumOverShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, partial, group):
        total = partial.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GradSummedOverShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _GatherOverShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.rank = dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank], None


def sum_over_shards(partial: torch.Tensor, layout: ItemLayout) -> torch.Tensor:
    if layout.n_shards == 1:
        return partial
    return _SumOverShards.apply(partial, layout.items_group)


def grad_summed_over_shards(x: torch.Tensor, layout: ItemLayout) -> torch.Tensor:
    if layout.n_shards == 1 or not x.requires_grad:
        return x
    return _GradSummedOverShards.apply(x, layout.items_group)


def gather_over_shards(x: torch.Tensor, layout: ItemLayout) -> torch.Tensor:
    if layout.n_shards == 1:
        return x[None]
    return _GatherOverShards.apply(x, layout.items_group)


def init_distributed(backend: str | None = None, timeout: timedelta = timedelta(minutes=10)) -> None:
    """dist.init_process_group from torchrun's environment, with every key of the group (and of the
    mesh's subgroups, which share its store) under a prefix of the restart count.

    Under `torchrun --max-restarts N` the store outlives a failed attempt, and the subgroups of the new
    attempt get the same names as those of the old one: a rank could read a dead peer's address and
    fail to connect. The prefix keeps each attempt's keys apart. `timeout` bounds how long a rank waits
    in a collective for a peer that is gone. backend None: nccl with CUDA, gloo without.
    """
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
        is_master=rank == 0 and not agent_hosts_store, timeout=timeout,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"recvae_fast/attempt_{attempt}/", store), rank=rank,
                            world_size=world_size, timeout=timeout)
