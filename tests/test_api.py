"""LlamaGenerator: the promised API on a tiny native model, and its errors."""
import pytest
import torch

import api.inference as inference
from api.inference import LlamaGenerator
from api.model_source import UnknownFormatError
from runtime.engine import PromptTooLongError
from runtime.kv_cache import OutOfBlocksError
from runtime.sampler import SamplingParams
from tests.helpers.tiny_models import make_hf_llama
from utils.checkpoint import CheckpointError
from utils.hf_import import convert


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_hf_llama(path, max_positions=64)
    return convert(str(path))


@pytest.fixture(scope="module")
def gen(model_dir):
    return LlamaGenerator(model_dir, device="cpu")


def test_properties(gen):
    assert gen.dtype == torch.float32
    assert gen.config.num_hidden_layers == 2
    assert gen.tokenizer.encode("Paris")
    assert gen.device == torch.device("cpu")


def test_generate_one_and_many(gen):
    text = gen.generate("The capital of France is", max_new_tokens=8)
    assert isinstance(text, str)
    texts = gen.generate(["The capital of France is", "Hello"], max_new_tokens=8)
    assert isinstance(texts, list) and texts[0] == text


def test_stream_pieces_join_to_generate(gen):
    pieces = list(gen.stream("Once upon a time", max_new_tokens=10))
    assert "".join(pieces) == gen.generate("Once upon a time", max_new_tokens=10)


def test_generate_ids_returns_only_new_tokens(gen):
    ids = gen.tokenizer.encode("Hello, world")
    new = gen.generate_ids(ids, max_new_tokens=5)
    assert 1 <= len(new) <= 5
    assert gen.tokenizer.decode(new) == gen.generate("Hello, world", max_new_tokens=5)


def test_logits_every_position(gen):
    ids = gen.tokenizer.encode("The capital")
    logits = gen.logits(ids)
    assert logits.shape == (len(ids), gen.config.vocab_size) and logits.dtype == torch.float32
    assert logits[-1].argmax().item() == gen.generate_ids(ids, max_new_tokens=1)[0]


def test_seeded_sampling_repeats(gen):
    kwargs = dict(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.95, seed=7)
    assert gen.generate("Hello", **kwargs) == gen.generate("Hello", **kwargs)


def test_stop_string_cuts_the_text(gen):
    full = gen.generate("The capital of France is", max_new_tokens=12)
    stop = full[3:5]
    cut = gen.generate("The capital of France is", max_new_tokens=12, stop=[stop])
    assert cut == full[:full.index(stop)]
    assert gen.cache.allocator.num_free == gen.cache.num_blocks


def test_prompt_longer_than_context_is_refused(gen):
    with pytest.raises(PromptTooLongError, match="the model's context is 64"):
        gen.generate("Hello " * 200, max_new_tokens=1)


def test_generation_stops_at_the_context(gen):
    ids = gen.tokenizer.encode("Hello " * 10)
    out = gen.generate_ids(ids, max_new_tokens=500)
    assert len(ids) + len(out) <= 64


def test_max_new_tokens_below_one_is_refused(gen):
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        gen.generate("Hello", max_new_tokens=0)


def test_out_of_kv_blocks_is_a_clear_error(model_dir):
    # a batch larger than the cache now waits its turn; one request outgrowing it cannot
    small = LlamaGenerator(model_dir, device="cpu", kv_cache_tokens=32)
    with pytest.raises(OutOfBlocksError, match="KV cache out of blocks"):
        small.generate(["Hello " * 5] * 8, max_new_tokens=20)
    assert small.cache.allocator.num_free == small.cache.num_blocks
    assert small.generate("Hello", max_new_tokens=2)


def test_layers_split_over_two_cpu_devices_give_the_same_logits(model_dir, gen):
    split = LlamaGenerator(model_dir, devices=["cpu", "cpu"], split=[1, 1])
    ids = gen.tokenizer.encode("The capital of France is")
    assert torch.equal(split.logits(ids), gen.logits(ids))


def test_device_none_falls_back_to_cpu_and_says_so_once(model_dir, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(inference, "_said_cpu_fallback", False)
    LlamaGenerator(model_dir)
    LlamaGenerator(model_dir)
    assert capsys.readouterr().err.count("running the PyTorch fallback on the CPU") == 1


def test_dtype_choice(model_dir):
    assert LlamaGenerator(model_dir, device="cpu", dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        LlamaGenerator(model_dir, device="cpu", dtype="int8")


@pytest.mark.parametrize("make, fmt, error, message", [
    (lambda p: p / "missing", "triton", CheckpointError, "model path not found"),
    (lambda p: p, "triton", CheckpointError, "is empty"),
    (lambda p: p, "onnx", UnknownFormatError, "unknown fmt 'onnx'"),
])
def test_bad_paths_and_formats(tmp_path, make, fmt, error, message):
    with pytest.raises(error, match=message):
        LlamaGenerator(str(make(tmp_path)), fmt=fmt, device="cpu")


def test_hf_folder_without_fmt_hf_gets_a_hint(tmp_path):
    make_hf_llama(tmp_path, tokenizer=False)
    with pytest.raises(CheckpointError, match="use fmt='hf'"):
        LlamaGenerator(str(tmp_path), device="cpu")


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        LlamaGenerator(str(path), device="cpu")


def test_folder_with_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="holds no model.json"):
        LlamaGenerator(str(tmp_path), device="cpu")


def test_a_batch_larger_than_the_cache_waits_its_turn(model_dir, gen):
    small = LlamaGenerator(model_dir, device="cpu", kv_cache_tokens=32)
    prompts = ["Hello " * 5, "The capital of France is", "Once upon a time"] * 3
    assert small.generate(prompts, max_new_tokens=4) == gen.generate(prompts, max_new_tokens=4)
    assert small.cache.allocator.num_free == small.cache.num_blocks


def test_per_request_sampling(gen):
    prompts = ["Hello", "Once upon a time", "The capital"]
    seeded = dict(temperature=1.0, top_k=50, seed=3, max_new_tokens=6)
    texts = gen.generate(prompts, max_new_tokens=8,
                         sampling=[{}, seeded, SamplingParams(max_new_tokens=2)])
    assert texts[0] == gen.generate("Hello", max_new_tokens=8)
    assert texts[1] == gen.generate("Once upon a time", **seeded)
    assert texts[2] == gen.generate("The capital", max_new_tokens=2)


def test_shared_keywords_apply_under_per_request_entries(gen):
    stop = gen.generate("Hello", max_new_tokens=12)[2:4]
    texts = gen.generate(["Hello", "Hello"], max_new_tokens=12, stop=[stop],
                         sampling=[{}, {"stop": []}])
    assert texts == [gen.generate("Hello", max_new_tokens=12, stop=[stop]),
                     gen.generate("Hello", max_new_tokens=12)]


@pytest.mark.parametrize("sampling, error, message", [
    ([{}], ValueError, "sampling has 1 entries for 2 prompts; give one per prompt"),
    ([{}, 0.5], TypeError, "each sampling entry must be a dict or SamplingParams, got float"),
    ([{}, {"top_p": 0}], ValueError, "top_p must be in"),
])
def test_bad_per_request_sampling_is_refused(gen, sampling, error, message):
    with pytest.raises(error, match=message):
        gen.generate(["a", "b"], sampling=sampling)


def test_progress_bar_off_when_stderr_is_not_a_terminal(gen, capsys):
    gen.generate(["Hello"] * 8, max_new_tokens=2)
    assert capsys.readouterr().err == ""
    gen.generate(["Hello"] * 8, max_new_tokens=2, progress=True)
    assert "8/8 requests, 16 tokens" in capsys.readouterr().err


def test_scheduler_options_are_checked_at_construction(model_dir):
    with pytest.raises(ValueError, match="max_num_seqs must be an integer >= 1, got 0"):
        LlamaGenerator(model_dir, device="cpu", max_num_seqs=0)
    small = LlamaGenerator(model_dir, device="cpu", max_num_batched_tokens=4, max_num_seqs=1)
    assert small.new_scheduler().max_num_batched_tokens == 4
    assert small.generate(["Hello", "The capital"], max_new_tokens=3) == \
        [small.generate("Hello", max_new_tokens=3), small.generate("The capital", max_new_tokens=3)]


def test_lookahead_is_a_generator_option(model_dir):
    ahead = LlamaGenerator(model_dir, device="cpu", lookahead=True)
    plain = LlamaGenerator(model_dir, device="cpu")
    assert ahead.new_scheduler().lookahead and not plain.new_scheduler().lookahead
    prompts = ["Hello", "The capital of France is"]
    assert ahead.generate(prompts, max_new_tokens=6) == plain.generate(prompts, max_new_tokens=6)


def test_stream_shares_the_prefix_of_an_earlier_prompt(gen):
    prompt = "Once upon a time there was a little llama who liked to run in the hills."
    first = "".join(gen.stream(prompt, max_new_tokens=6))
    assert "".join(gen.stream(prompt, max_new_tokens=6)) == first
    assert gen.cache.allocator.num_cached > 0
    assert gen.cache.allocator.num_free == gen.cache.num_blocks
