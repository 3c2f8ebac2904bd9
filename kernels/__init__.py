"""Triton kernels of c3dzoo, installed as ``c3dzoo.kernels``. Kernels know tensors, never modules."""
