"""Triton kernels, installed as ``diffusion_fast.kernels``: one module per op, launchers only (no autograd)."""
