"""Kernels: pure tensor functions (Triton + a torch reference beside each), ``[B, S, H, D]`` layout.

They know nothing of diffusers. Filled by the linear-attention and Triton kernel issues.
"""
