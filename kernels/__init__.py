"""The Triton kernels of recvae_fast, one op per module. Installed as `recvae_fast.kernels`.

This folder sits at the top of the repository but is the subpackage `recvae_fast.kernels`: setup.py
maps it with `package_dir={"recvae_fast.kernels": "kernels"}`, so `import recvae_fast.kernels.X`
works after `pip install .`, and after an editable install (`pip install -e .`) the same import
resolves to the files in this folder (tools and IDEs follow the editable finder).

Ops (each checks its inputs, launches on the tensors' CUDA device, and runs on CPU tensors only
under TRITON_INTERPRET=1, the tests' mode):
- sparse_input_layer.sparse_input_layer(batch, weight_t, bias, dropout_rate, keep_mask, seed,
  sparse_grad, grad_method): the encoder's first layer on a CSR batch (L2 norm, dropout, bias),
  with dense or row-sparse dW1; dropout_keep_mask(seed, nnz, p, device) gives its mask.
- multinomial_nll.multinomial_nll(z, weight, bias, batch): the decoder and the multinomial
  log-likelihood fused, no B × I matrix; 1 ≤ K ≤ MAX_K.
- row_sparse_adam.adam_step_row_sparse_(param, grad, exp_avg, exp_avg_sq, step, ...): one exact
  torch.optim.Adam step with a row-sparse gradient.
_common holds what they share (dtypes, tile configs, device guard, batch checks).

Checks: the kernel tests run the ops under the Triton interpreter against dense references;
tests/test_kernel_compile.py compiles them offline for sm_90/sm_80 (shared memory, spills);
benches/gpu_check.py is the one script for a GPU. The triton 3.6 interpreter needs numpy<2.4 (the
tests skip with that reason otherwise).
"""
