"""Benchmarks: `python -m bench.cpu` (neox-jax vs the parity model vs transformers) and `python -m bench.gpu`."""
