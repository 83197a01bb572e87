"""The "last program" pattern: work that needs every program's output (the attention merge, the
RMSNorm of a GEMV's whole output row) done by whichever program of the kernel finishes last,
found with an arrival counter, instead of by a second kernel launch. At batch-1 decode a launch
and its gap cost more than the few microseconds of work itself."""
import torch
import triton
import triton.language as tl

MIN_COUNTERS = 16384  # counters a buffer holds at least: batch x kv heads for the engine

# A CUDA graph bakes in the buffer's address and replays without zeroing it again, so the buffer
# is zeroed once, left at zero by every launch (the last program resets its counter) and never
# freed: a larger one, when needed, is added beside the older ones that earlier graphs still use.
# Launches on one device are stream-ordered, so one buffer per device serves every kernel.
_arrival_counters: dict[torch.device, list[torch.Tensor]] = {}


def arrival_counters(device: torch.device, needed: int) -> torch.Tensor:
    buffers = _arrival_counters.setdefault(device, [])
    if not buffers or buffers[-1].numel() < needed:
        # the engine runs each step eagerly before capturing it, so this happens outside graphs;
        # inside one, the zeroing would not be replayed and the memory would be the graph's
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("arrival counters: run a step eagerly before capturing it in a graph")
        size = max(needed, MIN_COUNTERS)
        buffers.append(torch.zeros(size, dtype=torch.int32, device=device))
    return buffers[-1]


@triton.jit
def is_last_arrival(counter, n_arrivals):
    """Count this program in; True for the last of n_arrivals, which sets the counter back to zero
    for the next kernel (and for the next replay of the graph, which does not re-zero it). Reads
    of what the other programs wrote must bypass L1 (cache_modifier=".cg")."""
    # every thread's stores come before the atomic, whose release then publishes them
    tl.debug_barrier()
    last = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == n_arrivals - 1
    if last:
        tl.store(counter, 0)  # all programs have arrived: nothing else touches it now
    return last
