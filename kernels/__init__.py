"""Ops of the model: each runs a Triton kernel on CUDA and its PyTorch reference elsewhere."""
from .argmax import argmax
from .attention import paged_attention
from .dispatch import use_triton
from .linear import linear
from .rmsnorm import rmsnorm
from .rotary import rope_tables, rotary_cache_write
from .silu_mul import silu_mul

__all__ = ["argmax", "linear", "paged_attention", "rmsnorm", "rope_tables",
           "rotary_cache_write", "silu_mul", "use_triton"]
