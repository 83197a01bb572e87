"""Arrival counters: how the last program of a group finds out that it is last, so that it can
combine the group's partial results itself instead of a second kernel doing it (the decode
attention's splits, the split-K decode GEMV's K chunks).

A CUDA graph bakes in the counter buffer's address and replays without zeroing it again, so the
buffer is zeroed once, left at zero by every launch (the last program resets its counter) and
never freed: a larger one, when needed, is added beside the older ones that earlier graphs still
use. Launches on one device are stream-ordered (with programmatic dependent launch, a kernel
touches the counters only after waiting for the one before), so one buffer per device serves
every kernel and layer."""
import torch
import triton
import triton.language as tl

MIN_COUNTERS = 16384  # groups a buffer covers at least: enough for the engine's kernels
_arrival_counters: dict[torch.device, list[torch.Tensor]] = {}


def arrival_counters(device: torch.device, needed: int) -> torch.Tensor:
    buffers = _arrival_counters.setdefault(device, [])
    if not buffers or buffers[-1].numel() < needed:
        # the engine runs each step eagerly before capturing it, so this happens outside graphs;
        # inside one, the zeroing would not be replayed and the memory would be the graph's
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("decode kernels: run a step eagerly before capturing it in a graph")
        size = max(needed, MIN_COUNTERS)
        buffers.append(torch.zeros(size, dtype=torch.int32, device=device))
    return buffers[-1]


@triton.jit
def is_last_arrival(counter, n_valid):
    """Count this program in; True for the group's last one, which sets the counter back to zero
    for the next launch (and for the next replay of the graph, which does not re-zero it)."""
    # every thread's partial stores come before the atomic, whose release then publishes them
    tl.debug_barrier()
    last = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == n_valid - 1
    if last:
        tl.store(counter, 0)  # all n_valid programs have arrived: nothing else touches it now
    return last
