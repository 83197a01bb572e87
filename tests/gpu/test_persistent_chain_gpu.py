"""bench/persistent_chain.py's kernel on a Hopper GPU: every op of every layer against float64
on the input the kernel itself read (bench.persistent_chain.worst_op_error)."""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available()
                                 or torch.cuda.get_device_capability()[0] < 9,
                                 reason="needs a Hopper or newer CUDA GPU")]

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_n, stages, warps", [(64, 8, 8), (32, 16, 4), (128, 4, 8)])
def test_every_op_matches_float64(dtype, block_n, stages, warps):
    from bench import persistent_chain as pc
    H, NQKV, I, layers = 2048, 2560, 4096, 3
    weights = pc.random_chain_weights(H, NQKV, I, layers, CUDA, dtype, seed=block_n)
    x0 = torch.randn(H, device=CUDA)
    chain = pc.PersistentChain(*weights, layers, block_n, 128, stages, warps)
    for _ in range(2):  # a second launch must re-zero the outputs and the op counter
        chain(x0)
        torch.cuda.synchronize()
        assert pc.worst_op_error(chain, x0, *weights) < 1e-5
        assert chain.y[-1].abs().max() > 0


def test_a_graph_replay_runs_the_whole_chain():
    from bench import persistent_chain as pc
    H, NQKV, I, layers = 2048, 3072, 8192, 2
    weights = pc.random_chain_weights(H, NQKV, I, layers, CUDA)
    x0 = torch.randn(H, device=CUDA)
    chain = pc.PersistentChain(*weights, layers)
    chain(x0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain(x0)
    x0.copy_(torch.randn(H, device=CUDA))
    graph.replay()
    torch.cuda.synchronize()
    assert pc.worst_op_error(chain, x0, *weights) < 1e-5
