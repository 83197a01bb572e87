"""A barrier across every program of a persistent kernel (kernels/block_tail.py), so that one
launch can run several dependent phases: what one phase's programs store, every program reads
in the next, as if a kernel boundary stood between them, without the launch.

Every program of the grid must be resident at once (one per SM and a grid of at most SM count
programs): a program spinning here never yields its SM. The interpreter runs programs one after
another, so it cannot pass a barrier at all: there the phases are separate launches instead.

The state is two int32 per device: an arrival count, back at zero after every barrier, and a
generation that each barrier advances by one. A CUDA graph bakes in its address and replays
without re-zeroing it, which is why the count resets itself; the generation may wrap, since
programs only compare it for a change."""
import torch
import triton
import triton.language as tl

from .arrival import arrival_counters

_states: dict[torch.device, torch.Tensor] = {}


def barrier_state(device: torch.device) -> torch.Tensor:
    """The device's (count, generation) pair, zeroed once outside any graph capture."""
    if device not in _states:
        arrival_counters(device, 1)  # refuses to allocate inside a capture, with the reason
        _states[device] = torch.zeros(2, dtype=torch.int32, device=device)
    return _states[device]


@triton.jit
def grid_barrier(state_ptr, n_programs):
    """Return once all n_programs programs have called it; their stores before it are visible
    to every program's loads after it."""
    tl.debug_barrier()  # every thread's stores come before the release below
    generation = tl.atomic_add(state_ptr + 1, 0, sem="relaxed", scope="gpu")
    arrived = tl.atomic_add(state_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == n_programs - 1:
        tl.atomic_xchg(state_ptr, 0, sem="relaxed", scope="gpu")  # before the release below
        tl.atomic_add(state_ptr + 1, 1, sem="release", scope="gpu")
    else:
        seen = generation
        while seen == generation:
            seen = tl.atomic_add(state_ptr + 1, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()  # the acquire above orders this program's later loads, all threads'
