"""Compiled kernels: C++ sources built on first use for the machine that runs them."""
