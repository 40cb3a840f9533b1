"""Offline GPU compile check of every Triton kernel in kernels/ (no GPU needed).

Each variant (kernel × tile config the kernel's prune keeps × dtype × flags × K) is compiled with
`triton.compile` for a CUDA `GPUTarget` (sm_90 and/or sm_80), then the PTX goes through `ptxas -v`
(the ptxas that ships in the triton wheel, the one triton itself uses for that arch) for registers
and spills; shared memory is what triton's compiler reserves (metadata.shared). A variant passes
when it compiles, fits the arch's shared memory (227 KB sm_90, 163 KB sm_80) and spills at most
SPILL_BUDGET bytes (stores + loads) per thread.

Spill budget, 64 bytes: a spill is a round trip to local memory (L1, then L2), and in these kernels
every live value sits in an inner loop over items, users or nonzeros, so any spill is paid per
tile, not once. A handful of spilled words (the compiler parking loop bounds or pointers) costs
little next to a tile's loads; hundreds of bytes mean an accumulator does not fit and cost more
than the loads themselves. 64 bytes = 16 fp32 words per thread admits the first and rejects the
second.

    python tools/compile_check.py                   # the sample (~26 variants)
    python tools/compile_check.py --level quick     # one variant per kernel (the test suite's default)
    python tools/compile_check.py --level full --json out.json   # every variant, sm_90 and sm_80
    tools/compile_check_triton36.sh [--level ...]   # the same under triton 3.6 (.venv36)

Levels. Sample (default): sm_90; K 200 and 1000 (the default latent size and the largest
supported; 512 for fp64, its limit); H 600; the multinomial-NLL forward and dW backward with their
accumulator on (COMPUTE_A, NEED_W: the register-heavy case) for tf32, bf16 and fp64, and of the
configs the prune keeps, the two with the largest estimated shared memory and accumulator (the ones
that would break first); the NLL gather at K 1000 (bf16) and 512 (fp64); the sparse-input forward
(dropout from a seed, aux outputs on), backward (both layouts), atomic backward, keep-mask and
row-sparse Adam kernels in fp32 and bf16 with their widest tile. Quick: one of those per kernel
(_QUICK), what tests/test_kernel_compile.py runs unless RECVAE_FAST_COMPILE_CHECK=sample|full.
Full: every config the prune keeps, every dtype (fp32 ieee, tf32, bf16, fp16, fp64), every flag
combination, K 64, 200, 600, 1000 (capped at MAX_K), both arches: 1200 variants, about an hour
on one core. Needs TRITON_INTERPRET unset (the kernels must be JIT functions).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

SPILL_BUDGET = 64
# fp64 is the accuracy path (tests, reference runs), never the speed path: a spill there costs
# speed, not correctness, so it gets a looser budget (measured: 84/76 B at its limit, K 512).
SPILL_BUDGET_FP64 = 256
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
K_VALUES = (64, 200, 600, 1000)
HIDDEN = 600

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_check: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from kernels import dropout_mask, nll_backward, nll_configs, nll_forward, nll_gather  # noqa: E402
from kernels import row_sparse_adam as rsa  # noqa: E402
from kernels import sparse_input_backward, sparse_input_backward_atomic, sparse_input_configs  # noqa: E402
from kernels import sparse_input_forward  # noqa: E402

# The JIT function of each kernel name the variants use.
KERNEL_FUNCTIONS = {
    "nll_fwd": nll_forward._fwd_kernel, "nll_bwd": nll_backward._bwd_w_kernel, "nll_gather": nll_gather._gather_kernel,
    "sil_fwd": sparse_input_forward._fwd_kernel, "sil_bwd": sparse_input_backward._bwd_kernel,
    "sil_bwd_atomic": sparse_input_backward_atomic._bwd_atomic_kernel, "row_sparse_adam": rsa._adam_kernel,
    "keep_mask": dropout_mask._keep_mask_kernel,
}

# dtype name → (triton pointer type of the data, accumulation pointer type, element size, DOT_PREC)
# The NLL's K values are capped at the dtype's MAX_K (fp64: 512), so the limit itself is checked.
_NLL_MAX_K = {"fp64": nll_configs.MAX_K[torch.float64], "default": nll_configs.MAX_K[torch.float32]}
_DTYPES = {
    "fp32-ieee": ("fp32", "fp32", 4, "ieee"),
    "tf32": ("fp32", "fp32", 4, "tf32"),
    "bf16": ("bf16", "fp32", 2, "tf32"),
    "fp16": ("fp16", "fp32", 2, "tf32"),
    "fp64": ("fp64", "fp64", 8, "ieee"),
}
_ACC_TL = {"fp32": tl.float32, "fp64": tl.float64}


@dataclass
class Variant:
    kernel: str
    dtype: str
    arch: int
    k: int | None
    flags: dict
    config: dict
    num_warps: int
    num_stages: int
    # what gets compiled: pointer/int types and constexpr values, by argument name
    signature: dict = field(repr=False)
    constexprs: dict = field(repr=False)

    def name(self) -> str:
        flags = ",".join(f"{k}={v}" for k, v in self.flags.items())
        cfg = ",".join(f"{k}={v}" for k, v in self.config.items())
        k = f" K={self.k}" if self.k is not None else ""
        return f"{self.kernel} {self.dtype} sm_{self.arch}{k} [{flags}] {{{cfg},w={self.num_warps},s={self.num_stages}}}"


def _variant(kernel, dtype, arch, k, flags, cfg, sig, const):
    fn = KERNEL_FUNCTIONS[kernel]
    sig = dict(sig)
    const = dict(const)
    meta = dict(cfg.kwargs) if isinstance(cfg, triton.Config) else dict(cfg)
    warps = cfg.num_warps if isinstance(cfg, triton.Config) else 4
    stages = cfg.num_stages if isinstance(cfg, triton.Config) else 1
    const.update(meta)
    for name in fn.arg_names:
        if name in const:
            sig[name] = "constexpr"
    missing = [n for n in fn.arg_names if n not in sig]
    assert not missing, f"{kernel}: no type for {missing}"
    shown = {k: (v if isinstance(v, (int, str, bool)) or v is None else str(v)) for k, v in flags.items()}
    return Variant(kernel, dtype, arch, k, shown, meta, warps, stages, sig, const)


# ----------------------------------------------------------------------------------------------
# Variant enumeration, one function per op module
# ----------------------------------------------------------------------------------------------
def nll_variants(arch, k_values, dtypes, wide_only):
    out = []
    for dtype in dtypes:
        ptr, acc, esize, prec = _DTYPES[dtype]
        fma = prec == "ieee"
        max_k = _NLL_MAX_K.get(dtype, _NLL_MAX_K["default"])
        for k in sorted({min(k, max_k) for k in k_values}):
            block_k = nll_configs.block_k(k)
            for wide in ((True,) if wide_only else (True, False)):
                for kind, stationary, streamed in (("fwd", "BLOCK_B", "BLOCK_I"), ("bwd", "BLOCK_I", "BLOCK_B")):
                    kept = nll_configs.fitting_configs(nll_configs.GPU_CONFIGS[kind, fma], block_k, esize, wide,
                                                       stationary, streamed, SMEM_LIMIT[arch], arch, fma)
                    if not kept:
                        out.append(("no-config", f"nll_{kind} {dtype} sm_{arch} K={k} wide={wide}"))
                        continue
                    for cfg in kept:
                        if kind == "fwd":
                            flags = dict(HAS_BIAS=True, COMPUTE_A=wide, DOT_PREC=prec)
                            sig = dict(Z=f"*{ptr}", W=f"*{ptr}", BIAS=f"*{ptr}", M_PART=f"*{acc}", S_PART=f"*{acc}",
                                       A_PART=f"*{acc}", B="i32", I="i32", K="i32", items_per_split="i32",
                                       stride_z="i32", stride_w="i32", B_BUCKET="i32")
                            const = dict(flags, ACC=_ACC_TL[acc], BLOCK_K=block_k)
                            if not wide:
                                const["A_PART"] = None
                            out.append(_variant("nll_fwd", dtype, arch, k, flags, cfg, sig, const))
                        else:
                            flags = dict(HAS_BIAS=True, NEED_W=wide, NEED_B=True, DOT_PREC=prec)
                            sig = dict(Z=f"*{ptr}", W=f"*{ptr}", BIAS=f"*{ptr}", LSE=f"*{acc}", GN=f"*{acc}",
                                       DW=f"*{ptr}", DB=f"*{ptr}", CSC_PTR="*i64", CSC_USER="*i64", CSC_ITEM="*i64",
                                       CSC_COEF=f"*{acc}", B="i32", I="i32", K="i32", n_gran="i32", stride_z="i32",
                                       stride_w="i32", B_BUCKET="i32")
                            const = dict(flags, ACC=_ACC_TL[acc], GRAN=nll_configs.CSC_GRAN, BLOCK_K=block_k)
                            if not wide:
                                const["DW"] = None
                            out.append(_variant("nll_bwd", dtype, arch, k, flags, cfg, sig, const))
            if dtype != "tf32":  # the gather has no dot: fp32-ieee covers fp32
                for store_xw in (True, False):
                    block_k = nll_configs.block_k(k)
                    flags = dict(HAS_BIAS=True, STORE_XW=store_xw)
                    sig = dict(Z=f"*{ptr}", W=f"*{ptr}", BIAS=f"*{ptr}", INDPTR="*i64", INDICES="*i64",
                               VALUES=f"*{ptr}", XDOT=f"*{acc}", NSUM=f"*{acc}", XW=f"*{acc}", K="i32",
                               stride_z="i32", stride_w="i32")
                    const = dict(flags, ACC=_ACC_TL[acc], BLOCK_K=block_k)
                    if not store_xw:
                        const["XW"] = None
                    cfg = triton.Config({"BLOCK_NZ": nll_configs.gather_block_nz(block_k)}, num_warps=4, num_stages=1)
                    out.append(_variant("nll_gather", dtype, arch, k, flags, cfg, sig, const))
    return out


def sil_variants(arch, dtypes, all_flags):
    out = []
    for dtype in dtypes:
        if dtype == "tf32":
            continue  # no dot on data: fp32-ieee covers fp32
        ptr, acc, _, _ = _DTYPES[dtype]
        modes = [(d, aux) for d in (0, 1, 2) for aux in (True, False)] if all_flags else [(1, True)]
        for dropout, aux in modes:
            flags = dict(HAS_BIAS=True, DROPOUT=dropout, WRITE_AUX=aux)
            sig = dict(OUT=f"*{ptr}", W=f"*{ptr}", BIAS=f"*{ptr}", INDPTR="*i64", INDICES="*i64", VALUES=f"*{ptr}",
                       KEEP="*u8", SCALE=f"*{acc}", COEF=f"*{acc}", ROWS="*i32", H="i32", stride_w0="i32",
                       stride_w1="i32", stride_out="i32", seed="i64", p="fp32", USERS_BUCKET="i32",
                       NNZ_BUCKET="i32")
            const = dict(flags, ACC=_ACC_TL[acc])
            if dropout != 2:
                const["KEEP"] = None
            if dropout == 0:
                const["SCALE"] = None
            if not aux:
                const["COEF"] = const["ROWS"] = None
            for cfg in sparse_input_configs.GPU_CONFIGS["fwd"]:
                out.append(_variant("sil_fwd", dtype, arch, None, flags, cfg, sig, const))
        # segment backward: SEG is the int32 sorted item ids (dense) or the int64 unique inverse (row-sparse)
        for layout, seg in (("dense", "i32"), ("row_sparse", "i64")):
            flags = dict(layout=layout)
            sig = dict(DW=f"*{ptr}", DH=f"*{ptr}", PERM="*i64", SEG=f"*{seg}", COEF=f"*{acc}", ROWS="*i32",
                       SEGPTR="*i64", R="i32", H="i32", stride_dw="i32", stride_dh="i32", R_BUCKET="i32",
                       NNZ_BUCKET="i32")
            for cfg in sparse_input_configs.GPU_CONFIGS["bwd"]:
                out.append(_variant("sil_bwd", dtype, arch, None, flags, cfg, sig,
                                    dict(ACC=_ACC_TL[acc])))
        # atomic backward adds into an accumulation-dtype buffer
        sig = dict(DW=f"*{acc}", DH=f"*{ptr}", INDPTR="*i64", OUTROW="*i64", COEF=f"*{acc}", H="i32",
                   stride_dw="i32", stride_dh="i32", USERS_BUCKET="i32", NNZ_BUCKET="i32", R_BUCKET="i32")
        for cfg in sparse_input_configs.GPU_CONFIGS["bwd_atomic"]:
            out.append(_variant("sil_bwd_atomic", dtype, arch, None, {}, cfg, sig, {}))
        sig = dict(P=f"*{ptr}", M=f"*{ptr}", V=f"*{ptr}", G=f"*{ptr}", GROW="*i32", HYPER=f"*{acc}", R="i32",
                   H="i32", stride_p="i32", stride_m="i32", stride_v="i32", stride_g="i32")
        cfg = triton.Config({"BLOCK_R": rsa._BLOCK_R, "BLOCK_H": rsa._BLOCK_H}, num_warps=rsa._NUM_WARPS, num_stages=1)
        out.append(_variant("row_sparse_adam", dtype, arch, None, {}, cfg, sig, {}))
    cfg = triton.Config({"BLOCK": 1024}, num_warps=4, num_stages=1)
    out.append(_variant("keep_mask", "u8", arch, None, {}, cfg,
                        dict(OUT="*u8", n="i32", seed="i64", p="fp32"), {}))
    return out


def _estimates(v: Variant):
    """(smem, accumulator registers) estimate of an NLL variant, to pick the sample's worst configs."""
    if not v.kernel.startswith("nll_") or v.kernel == "nll_gather":
        return (0, 0)
    esize = _DTYPES[v.dtype][2]
    block_k = v.constexprs["BLOCK_K"]
    res, stream = (v.config["BLOCK_B"], v.config["BLOCK_I"]) if v.kernel == "nll_fwd" else (
        v.config["BLOCK_I"], v.config["BLOCK_B"])
    kc = v.config["KC"] or block_k
    smem = (max(v.num_stages, 1) * (res + stream) * kc + stream * block_k) * esize
    return (smem, res * block_k * max(esize, 4) // (4 * 32 * v.num_warps))


# The quick level (what the test suite runs by default): one variant per kernel from the sample,
# the one most likely to break for that kernel: the largest shared memory / accumulator tiles.
_QUICK = (
    ("nll_fwd", "tf32", 200), ("nll_bwd", "bf16", 1000), ("nll_fwd", "fp64", 512), ("nll_gather", "bf16", 1000),
    ("sil_fwd", "bf16", None), ("sil_bwd", "bf16", None), ("sil_bwd_atomic", "fp32-ieee", None),
    ("row_sparse_adam", "fp32-ieee", None), ("keep_mask", "u8", None),
)


def enumerate_variants(level: str):
    if level == "quick":
        sample = enumerate_variants("sample")
        picked = []
        for kernel, dtype, k in _QUICK:
            picked += [v for v in sample if not isinstance(v, tuple) and (v.kernel, v.dtype, v.k) == (kernel, dtype, k)][:1]
        return picked + [v for v in sample if isinstance(v, tuple)]
    if level == "full":
        dtypes = list(_DTYPES)
        variants = []
        for arch in (90, 80):
            variants += nll_variants(arch, K_VALUES, dtypes, wide_only=False)
            variants += sil_variants(arch, dtypes, all_flags=True)
        return variants
    sample = []
    nll = nll_variants(90, (200, 1000), ("tf32", "bf16", "fp64"), wide_only=True)
    groups = {}
    for v in nll:
        if isinstance(v, tuple):
            sample.append(v)
            continue
        if v.kernel == "nll_gather":
            if v.k >= 512 and v.flags["STORE_XW"] and v.dtype in ("bf16", "fp64"):
                sample.append(v)
            continue
        groups.setdefault((v.kernel, v.dtype, v.k), []).append(v)
    for group in groups.values():
        worst = {max(group, key=lambda v: _estimates(v)[0]).name(): None,
                 max(group, key=lambda v: _estimates(v)[1]).name(): None}
        sample += [v for v in group if v.name() in worst]
    sil_all = sil_variants(90, ("fp32-ieee", "bf16"), all_flags=False)
    by_kernel = {}
    for v in sil_all:  # the widest tile of each kernel and dtype
        width = v.config.get("BLOCK_H", 0) * v.config.get("BLOCK_R", 1) * v.config.get("BLOCK_NZ", 1)
        key = (v.kernel, v.dtype, str(v.flags))
        if key not in by_kernel or width > by_kernel[key][0]:
            by_kernel[key] = (width, v)
    sample += [v for _, v in by_kernel.values()]
    return sample


# ----------------------------------------------------------------------------------------------
# Compile + ptxas
# ----------------------------------------------------------------------------------------------
_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def ptxas_path(arch: int) -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        path = get_ptxas(arch).path
    except Exception:  # noqa: BLE001 - no nvidia backend or no ptxas in this triton install
        return None
    return path if path and os.path.exists(path) else None


def compile_variant(v: Variant) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = KERNEL_FUNCTIONS[v.kernel]
    record = {"name": v.name(), **{k: val for k, val in asdict(v).items() if k not in ("signature", "constexprs")}}
    # torch allocations are 16-byte aligned: tell the compiler, as the launcher does for real tensors
    pointers = [i for i, n in enumerate(fn.arg_names) if v.signature[n].startswith("*") and v.constexprs.get(n, 0) is not None]
    attrs = {(i,): [["tt.divisibility", 16]] for i in pointers}
    start = time.perf_counter()
    try:
        src = ASTSource(fn=fn, signature=v.signature, constexprs=v.constexprs, attrs=attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", v.arch, 32),
                                options={"num_warps": v.num_warps, "num_stages": v.num_stages})
    except Exception as exc:  # noqa: BLE001 - a compile failure is a result, reported with its message
        record.update(ok=False, error=f"compile failed: {type(exc).__name__}: {str(exc)[:500]}")
        return record
    record["smem"] = int(kernel.metadata.shared)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        arch = f"sm_{v.arch}a" if v.arch >= 90 else f"sm_{v.arch}"
        run = subprocess.run([ptxas_path(v.arch), "-v", f"--gpu-name={arch}", ptx, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True)
    if run.returncode != 0:
        record.update(ok=False, error=f"ptxas failed: {run.stderr[-500:]}")
        return record
    for key, rx in _PTXAS_RE.items():
        m = rx.search(run.stderr)
        record[key] = int(m.group(1)) if m else 0
    record["seconds"] = round(time.perf_counter() - start, 2)
    spills = record["spill_stores"] + record["spill_loads"]
    budget = SPILL_BUDGET_FP64 if v.dtype == "fp64" else SPILL_BUDGET
    problems = []
    if record["smem"] > SMEM_LIMIT[v.arch]:
        problems.append(f"shared memory {record['smem']} B > {SMEM_LIMIT[v.arch]} B")
    if spills > budget:
        problems.append(f"spills {record['spill_stores']}/{record['spill_loads']} B (stores/loads) > {budget} B")
    record.update(ok=not problems, error="; ".join(problems))
    return record


def run_check(level: str, workers: int, only: str | None = None):
    variants = enumerate_variants(level)
    if only:
        variants = [v for v in variants if only in (v[1] if isinstance(v, tuple) else v.name())]
    no_config = [f"no config fits: {v[1]}" for v in variants if isinstance(v, tuple)]
    variants = [v for v in variants if not isinstance(v, tuple)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            records = list(pool.map(compile_variant, variants))
    else:
        records = [compile_variant(v) for v in variants]
    return records, no_config


def summary(records, no_config) -> str:
    lines = [f"triton {triton.__version__}: {len(records)} variants, "
             f"{sum(r['ok'] for r in records)} pass, {len(records) - sum(r['ok'] for r in records)} fail, "
             f"{len(no_config)} shapes without a fitting config"]
    good = [r for r in records if "registers" in r]
    if good:
        worst_spill = max(good, key=lambda r: r["spill_stores"] + r["spill_loads"])
        worst_smem = max(good, key=lambda r: r["smem"])
        lines.append(f"  worst spills: {worst_spill['spill_stores']}/{worst_spill['spill_loads']} B "
                     f"(stores/loads) in {worst_spill['name']}")
        lines.append(f"  most shared memory: {worst_smem['smem']} B in {worst_smem['name']}")
        lines.append(f"  max registers: {max(r['registers'] for r in good)}")
    for r in records:
        if not r["ok"]:
            lines.append(f"  FAIL {r['name']}: {r['error']}")
    lines += [f"  FAIL {m}" for m in no_config]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--level", choices=("quick", "sample", "full"), default="sample",
                        help="quick: one variant per kernel (the test suite); sample: the worst configs "
                             "(default); full: every variant on sm_90 and sm_80 (slow)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--json", help="write every variant's record to this file")
    parser.add_argument("--list", action="store_true", help="list the variants and exit")
    parser.add_argument("--only", help="keep the variants whose name contains this text (e.g. 'nll_fwd tf32 sm_90')")
    args = parser.parse_args(argv)
    for arch in (90, 80):
        if ptxas_path(arch) is None:
            print(f"compile_check: no ptxas for sm_{arch} in this triton install", file=sys.stderr)
            return 2
    if args.list:
        for v in enumerate_variants(args.level):
            name = v[1] if isinstance(v, tuple) else v.name()
            if not args.only or args.only in name:
                print(name)
        return 0
    start = time.perf_counter()
    records, no_config = run_check(args.level, args.workers, args.only)
    print(summary(records, no_config))
    print(f"  {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "spill_budget": SPILL_BUDGET, "records": records,
                       "no_config": no_config}, f, indent=1)
    return 0 if all(r["ok"] for r in records) and not no_config else 1


if __name__ == "__main__":
    sys.exit(main())
