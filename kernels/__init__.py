"""Ops of the model, one module each (kernels.rmsnorm, kernels.rotary, kernels.linear,
kernels.silu_mul, kernels.gate_up_silu, kernels.attention, kernels.argmax): each runs a Triton
kernel on CUDA and its PyTorch reference elsewhere; kernels.dispatch decides. Import the
functions from their modules."""
