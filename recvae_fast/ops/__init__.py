"""The fast ops, one module each: its plain-torch code, its C++ binding, its torch.library
registration (under `recvae_fast::`, with autograd and autocast) and its entry point.

    sparse_input_layer   fc1 over a CSR batch                      torch, cpp, triton
    multinomial_nll      the likelihood fused with the decoder     torch, cpp, triton
    swish_layer_norm     the encoder's layer tail                  torch, cpp
    composite_prior_kl   the KL term per user                      torch, cpp
    topk_masked          top-k without the seen items              torch, cpp
    row_sparse_adam      Adam's step on a row-sparse gradient      torch, cpp, triton
    sparse_rows          the C++ CSR row sums and transpose (sparse_input_layer's "cpp" backward)

`dispatch` holds the one rule that picks an implementation (`impl=`, RECVAE_FAST_IMPL) and
imports no op. An op is registered when its module is imported; the Triton implementations are
registered next to their kernels (recvae_fast.kernels, torch.library.triton_op). Registered ops
are visible by name to the profiler, checked by torch.library.opcheck, and opaque to
torch.compile (their fake implementations give the output shapes), so the loss traces with
fullgraph=True. With the row-sparse fc1 gradient Inductor's backward fails ("Cannot access storage
of SparseTensorImpl", torch 2.13: Inductor does not take sparse tensors); that path runs eager.

This package imports none of its modules: import the one you use.
"""
