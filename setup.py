"""Build script for recvae_fast.

`kernels/` (the Triton ops, one per file) installs as the subpackage `recvae_fast.kernels`.
The C++ extensions in csrc/ (masked top-k, row-sparse Adam step, CSR row sums, the NLL's per-block
forward and decoder-backward steps, the encoder's swish + LayerNorm) are compiled with pybind11
only; they take raw buffers, so the build never needs torch.
"""
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

openmp = [] if os.environ.get("RECVAE_FAST_NO_OPENMP") else ["-fopenmp"]


def cpp_extension(module: str, source: str, *flags: str, headers: tuple[str, ...] = ()) -> Pybind11Extension:
    """recvae_fast.<module> from csrc/<source> (and the csrc/ headers it includes): C++17, -O3,
    OpenMP unless RECVAE_FAST_NO_OPENMP."""
    return Pybind11Extension(f"recvae_fast.{module}", [f"csrc/{source}"], cxx_std=17,
                             depends=[f"csrc/{h}" for h in headers],
                             extra_compile_args=["-O3", *flags, *openmp], extra_link_args=openmp)


simd_flags = ("-fopenmp-simd", "-fno-trapping-math")
shared_headers = ("fast_exp.h", "column_sums.h")
ext_modules = [
    cpp_extension("_topk", "topk_masked.cpp"),
    # -fno-math-errno lets the row loop's sqrt vectorise (it changes no value); no FMA contraction,
    # so the rounding stays that of torch's separate multiply and add.
    cpp_extension("_row_sparse_adam", "row_sparse_adam.cpp", "-fno-math-errno", "-ffp-contract=off"),
    cpp_extension("_sparse_rows", "sparse_rows.cpp"),
    # -fopenmp-simd: the `omp simd` reductions vectorise even in a build without OpenMP;
    # -fno-trapping-math: fast_exp.h's floor() vectorises (it changes no value, only FP exception flags).
    cpp_extension("_nll_blocks", "nll_blocks.cpp", *simd_flags, headers=shared_headers),
    cpp_extension("_swish_layer_norm", "swish_layer_norm.cpp", *simd_flags, headers=shared_headers),
    cpp_extension("_composite_prior_kl", "composite_prior_kl.cpp", *simd_flags, headers=("fast_exp.h",)),
]

setup(
    name="recvae_fast",
    version="0.1.0",
    description="Fast RecVAE: sparse encoder input, fused softmax cross-entropy decoder, masked top-k",
    python_requires=">=3.11",
    packages=["recvae_fast", "recvae_fast.data", "recvae_fast.distributed", "recvae_fast.kernels", "recvae_fast.ops"],
    # The top-level kernels/ folder is installed as the subpackage recvae_fast.kernels (an editable
    # install maps it too, so `import recvae_fast.kernels.X` resolves to kernels/X.py).
    package_dir={"recvae_fast": "recvae_fast", "recvae_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    install_requires=["numpy>=2.0", "scipy>=1.10", "pyarrow>=14", "torch>=2.4", "tqdm>=4.60"],
    extras_require={
        "triton": ["triton>=3.0"],
        "report": ["matplotlib>=3.5"],
        "tune": ["optuna>=4.0", "matplotlib>=3.5"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "triton>=3.0", "matplotlib>=3.5", "optuna>=4.0"],
        "bench": ["pytest>=8", "pytest-benchmark>=4", "pandas>=2"],  # everything `pytest benches/` imports
    },
    entry_points={"console_scripts": ["recvae-fast=recvae_fast.entry:main"]},
    zip_safe=False,
)
