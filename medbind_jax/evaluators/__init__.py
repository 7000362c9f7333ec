"""Evaluators for MEDBind-JAX (DESIGN.md section 7).

The metric kernels live in `medbind_jax.evaluators.metrics`: pure numpy, unit-tested apart from the data plumbing.
"""
