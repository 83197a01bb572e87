"""bench/bench_throughput.py's pieces on the CPU: requests, memory arithmetic, padding, one
tiny run of ours and of transformers, and the table."""
import pytest

from bench import bench_throughput as bt
from tests.helpers.tiny_models import make_hf_llama
from utils.hf_import import convert


def test_requests_of_each_setting():
    a = bt.make_requests("a", vocab=100, count=4)
    b = bt.make_requests("b", vocab=100, count=50)
    assert [len(p) for p in a] == [128] * 4
    assert all(32 <= len(p) <= 512 for p in b) and len({len(p) for p in b}) > 10
    assert all(0 <= t < 100 for p in a + b for t in p)
    assert bt.make_requests("b", 100, 5) == bt.make_requests("b", 100, 5)
    with pytest.raises(ValueError, match="unknown setting 'c'; choose from"):
        bt.make_requests("c", 100)


def test_kv_memory_against_contiguous_caches():
    got = bt.kv_memory([10, 30], new_tokens=5, peak_blocks=4, bytes_per_block=64,
                       bytes_per_token=4, context=100)
    assert got == {"paged": 256, "contiguous": (15 + 35) * 4, "max_context": 2 * 100 * 4}


def test_left_pad():
    ids, mask = bt.left_pad([[5, 6, 7], [8]])
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_tiny_runs_and_table(tmp_path):
    from api.inference import LlamaGenerator
    hf = make_hf_llama(tmp_path, max_positions=128)
    gen = LlamaGenerator(convert(str(tmp_path)), device="cpu", kv_cache_tokens=256)
    gen.engine.eos_ids = set()
    prompts = bt.make_requests("b", 320, count=3)
    prompts = [p[:40] for p in prompts]
    row = {"setting": "b", **bt.run_ours(gen.engine, prompts, 4, max_num_batched_tokens=64)}
    assert row["generated"] == 12 and row["peak_blocks"] >= 3
    row.update(bt.kv_memory([40] * 3, 4, row["peak_blocks"], gen.cache.bytes_per_block, 1, 128))
    row.update({"hf_" + k: v for k, v in bt.run_hf(hf, prompts, 4, batch=2).items()})
    assert "transformers eager" in bt.row_line(row)
    table = bt.table([("tiny", row)])
    assert table.splitlines()[2].startswith("| tiny | 256 x (32..512 prompt + 128 new) |")


def test_the_warm_up_runs_the_timed_schedule_step_for_step(tmp_path, monkeypatch):
    """Issue 7's setting (b) looked 10x slower than (a) because its warm-up used other prompt
    lengths, so the timed run met a decode batch bucket (32) for the first time and paid its
    autotuning and graph capture. The warm-up must run every step shape the timed run will."""
    from api.inference import LlamaGenerator
    make_hf_llama(tmp_path, max_positions=1024)
    gen = LlamaGenerator(convert(str(tmp_path)), device="cpu", kv_cache_tokens=8192)
    gen.engine.eos_ids = set()
    steps, real = [], gen.engine.forward

    def record(seqs, tokens, *args, **kw):
        steps.append([len(t) for t in tokens])   # the step's shape: tokens per sequence
        return real(seqs, tokens, *args, **kw)

    monkeypatch.setattr(gen.engine, "forward", record)
    row, prompts = bt.measure_setting(gen.engine, "b", count=12, new_tokens=3,
                                      max_num_batched_tokens=1024)
    assert row["setting"] == "b" and row["generated"] == 36
    assert [len(p) for p in prompts] == [len(p) for p in bt.make_requests("b", 320, 12)]
    half = len(steps) // 2
    # identical halves: same lengths, and no prefix of the warm-up reused by the timed run
    assert len(steps) == 2 * half and steps[:half] == steps[half:]
