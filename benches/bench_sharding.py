"""Weak scaling of the item-sharded RecVAE with gloo on the CPU: items per shard fixed, 1, 2, 4 shards.

Each shard is one process (one intra-op thread) holding ITEMS_PER_SHARD items; every step is what
fit_sharded runs (recvae_fast.distributed.training.sharded_train_step: forward, backward, Adam).
Reported per shard count: the median encoder and decoder step times, and the bytes each rank puts into
collectives per step (the tensor it hands to all_reduce, or its own part of an all_gather), counted by
wrapping torch.distributed's all_reduce / all_gather, next to the formula (in elements):

    encoder step: h1 (B·H) + the old encoder's h1 (B·H) + its shard's LSEs (B) + Σ x·logit (B) + dz (B·K)
    decoder step: h1 (B·H) + its shard's LSEs (B) + Σ x·logit (B)       (no dz, no KL in a decoder step)

independent of the number of items. With one shard the one-device RecVAE step (recvae_fast.training.
train_step) on the same problem is timed alternately beside it. The bench asserts that the counted bytes equal the formula. On
this 2-core machine 4 processes share 2 cores, so the 4-shard step time measures oversubscription,
not scaling; the traffic figures hold anywhere.
"""
from __future__ import annotations

import json
import statistics
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from batches import user_item_batch

from recvae_fast import RecVAE
from recvae_fast.distributed import ShardedRecVAE, item_layout, make_item_mesh
from recvae_fast.distributed.checkpoint import gather_full_state_dict
from recvae_fast.distributed.training import sharded_train_step
from recvae_fast.training import TrainConfig, make_optimizers, train_step

ITEMS_PER_SHARD, N_USERS, ITEMS_PER_USER, HIDDEN, LATENT = 20_000, 500, 75, 600, 200
ROUNDS, WARMUP = 5, 1


def formula_bytes(phase: str, n_shards: int, batch: int = N_USERS, hidden: int = HIDDEN, latent: int = LATENT,
                  element_bytes: int = 4) -> int:
    """Collective payload per rank per step (item group only; 0 with one shard)."""
    if n_shards == 1:
        return 0
    elements = batch * (hidden + 2)
    if phase == "encoder":
        elements += batch * (hidden + latent)
    return elements * element_bytes


class _CountingCollectives:
    """Adds up the payload bytes this rank hands to all_reduce / all_gather while active."""

    def __init__(self):
        self.bytes = 0
        self._originals = (dist.all_reduce, dist.all_gather)

    def __enter__(self):
        all_reduce, all_gather = self._originals

        def counted_all_reduce(tensor, *args, **kwargs):
            self.bytes += tensor.numel() * tensor.element_size()
            return all_reduce(tensor, *args, **kwargs)

        def counted_all_gather(out, tensor, *args, **kwargs):
            self.bytes += tensor.numel() * tensor.element_size()
            return all_gather(out, tensor, *args, **kwargs)

        dist.all_reduce, dist.all_gather = counted_all_reduce, counted_all_gather
        return self

    def __exit__(self, *exc):
        dist.all_reduce, dist.all_gather = self._originals


def _worker(rank, world_size, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=300))
    try:
        n_items = ITEMS_PER_SHARD * world_size
        layout = item_layout(make_item_mesh(world_size), n_items)
        torch.manual_seed(0)
        model = ShardedRecVAE(layout, HIDDEN, LATENT)
        encoder_opt, decoder_opt = make_optimizers(model, 5e-4)
        cfg = TrainConfig(hidden_dim=HIDDEN, latent_dim=LATENT, batch_size=N_USERS)
        ratings = user_item_batch(N_USERS, n_items, ITEMS_PER_USER)
        model.train()
        # With one shard, the one-device RecVAE step on the same problem runs alternately beside it: the
        # cost of the sharded code path itself, measured in the same run.
        one_device = None
        if world_size == 1:
            one_device = RecVAE(HIDDEN, LATENT, n_items)
            one_device.load_state_dict(gather_full_state_dict(model))
            one_device.train()
            one_device_opts = make_optimizers(one_device, 5e-4, sparse_fc1_grad=False)
        result = {"n_shards": world_size, "n_items": n_items}
        for j, (phase, opt) in enumerate((("encoder", encoder_opt), ("decoder", decoder_opt))):
            times, one_device_times, counted = [], [], []
            for k in range(WARMUP + ROUNDS):
                dist.barrier()
                with _CountingCollectives() as counter:
                    t0 = time.perf_counter()
                    sharded_train_step(model, ratings, [opt], cfg, phase)
                    elapsed = time.perf_counter() - t0
                if one_device is not None:
                    t0 = time.perf_counter()
                    train_step(one_device, one_device.as_batch(ratings), [one_device_opts[j]], cfg, phase)
                    one_device_elapsed = time.perf_counter() - t0
                if k >= WARMUP:
                    times.append(elapsed)
                    counted.append(counter.bytes)
                    if one_device is not None:
                        one_device_times.append(one_device_elapsed)
            result[phase] = {"median_s": statistics.median(times), "bytes": counted[0],
                             "bytes_all_steps_equal": len(set(counted)) == 1}
            if one_device is not None:
                result[phase]["one_device_median_s"] = statistics.median(one_device_times)
        if rank == 0:
            with open(out_file, "w", encoding="utf-8") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("n_shards", [1, 2, 4])
def test_weak_scaling(tmp_path, n_shards, bench_record):
    torch.optim.Adam([torch.zeros(1, requires_grad=True)], fused=True)  # lazy import paid before forking
    out_file = tmp_path / "result.json"
    mp.start_processes(_worker, args=(n_shards, str(tmp_path / "pg_init"), str(out_file)), nprocs=n_shards,
                       join=True, start_method="fork")
    result = json.loads(out_file.read_text())
    bench_record(n_items=result["n_items"], **{f"{phase}_{key}": value for phase in ("encoder", "decoder")
                                               for key, value in result[phase].items()})
    lines = [f"{n_shards} shard(s), {result['n_items']:,} items ({ITEMS_PER_SHARD:,} per shard), B {N_USERS}, "
             f"H {HIDDEN}, K {LATENT}, float32"]
    for phase in ("encoder", "decoder"):
        r = result[phase]
        expected = formula_bytes(phase, n_shards)
        lines.append(f"  {phase} step: median {r['median_s']:.4f} s; collective bytes per rank {r['bytes']:,} "
                     f"(formula {expected:,})")
        if "one_device_median_s" in r:
            lines.append(f"    one-device RecVAE step beside it: {r['one_device_median_s']:.4f} s "
                         f"(sharded path / one device: {r['median_s'] / r['one_device_median_s']:.2f}x)")
        assert r["bytes_all_steps_equal"], "the traffic of a step must not vary"
        assert r["bytes"] == expected, f"{phase}: counted {r['bytes']} bytes, the formula says {expected}"
    print("\n" + "\n".join(lines))


INIT_ITEMS, INIT_SHARDS, INIT_ROUNDS = 100_000, 4, 3


def test_initialisation_cost(bench_record):
    """What ShardedRecVAE's two initialisations cost one rank (one shard of INIT_SHARDS over INIT_ITEMS
    items, H 600, K 200, float32, no process group needed to build one), timed alternately beside the
    one-device RecVAE(H, K, INIT_ITEMS) construction: "one-device" draws all I × (2H + K + 1) numbers as
    RecVAE does (so about its time, whatever the number of shards); "blocked" draws only the shard's rows."""
    from recvae_fast.distributed import ItemLayout

    torch.set_num_threads(1)
    layout = ItemLayout(INIT_ITEMS, INIT_SHARDS, 1, 1, 0)
    builders = {
        "one-device RecVAE": lambda: RecVAE(HIDDEN, LATENT, INIT_ITEMS),
        "ShardedRecVAE init one-device": lambda: ShardedRecVAE(layout, HIDDEN, LATENT, init="one-device"),
        "ShardedRecVAE init blocked": lambda: ShardedRecVAE(layout, HIDDEN, LATENT, init="blocked"),
    }
    times = {name: [] for name in builders}
    for _ in range(INIT_ROUNDS):
        for name, build in builders.items():
            t0 = time.perf_counter()
            build()
            times[name].append(time.perf_counter() - t0)
    numbers = INIT_ITEMS * (2 * HIDDEN + LATENT + 1)
    base = statistics.median(times["one-device RecVAE"])
    bench_record(**{name.replace(" ", "_").replace("-", "_") + "_s": statistics.median(t) for name, t in times.items()})
    lines = [f"initialisation, {INIT_ITEMS:,} items, shard 2 of {INIT_SHARDS}, H {HIDDEN}, K {LATENT}, float32, "
             f"1 thread, median of {INIT_ROUNDS}:"]
    for name, t in times.items():
        median = statistics.median(t)
        lines.append(f"  {name}: {median:.3f} s ({median / numbers * 1e9:.1f} ns per item-row number of the whole "
                     f"model; {median / base:.2f}x the one-device construction)")
    print("\n" + "\n".join(lines))
