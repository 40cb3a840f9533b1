"""The Triton kernels of recvae_fast (the subpackage `recvae_fast.kernels`), one kernel per module.

Where this folder lives, and why: it sits at the top of the repository, beside csrc/ (the C++
extensions), but is the subpackage `recvae_fast.kernels`. setup.py maps it with
`package_dir={"recvae_fast.kernels": "kernels"}`, so `import recvae_fast.kernels.X` works after
`pip install .`, and after an editable install (`pip install -e .`) the same import resolves to the
files in this folder (tools and IDEs follow the editable finder). kernels/ and csrc/ are the two
compiled back ends, each with its own toolchain and checks (here: the interpreter tests and the
offline compile check), kept side by side apart from the Python code of recvae_fast/. Triton is an
optional dependency: recvae_fast imports this package only when the Triton implementation is asked
for (impl="triton"), so the rest of recvae_fast works without triton installed. This docstring is
the one place that explains the mapping.

Ops (each checks its inputs, launches on the tensors' CUDA device, and runs on CPU tensors only
under TRITON_INTERPRET=1, the tests' mode); the entry points the package imports:
- multinomial_nll.multinomial_nll(z, weight, bias, batch) and multinomial_nll_parts: the decoder and
  the multinomial log-likelihood fused, no B × I matrix; 1 ≤ K ≤ MAX_K. The op, its registration
  and autograd; its kernels:
  - nll_forward: the log-sum-exp over item splits (and the softmax-weighted Wd rows for dz);
  - nll_gather: the indexed dot over each user's nonzeros;
  - nll_backward: dWd and dbd per item tile;
  - nll_configs: their tile configurations, MAX_K, and the prune rule (shared memory, registers).
- sparse_input_layer.sparse_input_layer(batch, weight_t, bias, dropout_rate, keep_mask, seed,
  sparse_grad, grad_method): the encoder's first layer on a CSR batch (L2 norm, dropout, bias),
  with dense or row-sparse dW1; dropout_keep_mask(seed, nnz, p, device) gives its mask. The op,
  its registration and autograd; its kernels:
  - sparse_input_forward: h1_pre by a gather of W1's rows;
  - dropout_mask: the Philox keep-mask of the nonzeros (the forward draws the same);
  - sparse_input_backward: dW1 by a segment reduction over the nonzeros sorted by item (default);
  - sparse_input_backward_atomic: dW1 by an atomic scatter (a measured alternative);
  - sparse_input_configs: their tile configurations.
- row_sparse_adam.adam_step_row_sparse_(param, grad, exp_avg, exp_avg_sq, step, ...): one exact
  torch.optim.Adam step with a row-sparse gradient (one kernel, its launcher and op).
_common holds what they share (dtypes, tile configs, device guard, batch checks, the JIT tile helpers).

Checks: the kernel tests run the ops under the Triton interpreter against dense references;
tests/test_kernel_compile.py compiles them offline for sm_90/sm_80 (shared memory, spills);
tools/gpu_check.py is the one script for a GPU. The triton 3.6 interpreter needs numpy<2.4 (the
tests skip with that reason otherwise).
"""
