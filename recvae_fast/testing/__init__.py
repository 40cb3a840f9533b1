"""What the tests and benches compare against, not part of the public API.

`reference`: a plain, dense PyTorch RecVAE that computes what the authors' code computes, with
their module and parameter names; every fast op and the model are checked against it on odd sizes,
values and gradients, and the benches time against it.
"""
