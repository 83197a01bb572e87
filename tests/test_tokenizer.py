"""utils/tokenizer.py on both backends: round trips (English, Chinese, emoji, code), BOS/EOS
rules, streaming that never splits a character, and the errors a user can cause."""
import json
import os

import pytest

from graph.config import LlamaConfig
from tests.helpers.tiny_sentencepiece import train_sentencepiece
from tests.helpers.tiny_tokenizer import make_tokenizer, write_tokenizer
from utils.tokenizer import Tokenizer, TokenizerError

TEXTS = ["The capital of France is Paris.", "台灣的首都是？", "emoji 😀👍🏽 and ✓",
         "def add(a, b):\n    return a + b  # 2025\n", "  two leading spaces\t\ttabs\r\n",
         "mixed 日本 text, 123 numbers"]


def _config(bos=None, eos=None) -> LlamaConfig:
    return LlamaConfig(vocab_size=400, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                       num_attention_heads=1, num_key_value_heads=1, head_dim=8,
                       bos_token_id=bos, eos_token_id=eos)


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sp")
    train_sentencepiece(folder)
    return str(folder)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    write_tokenizer(folder, 320, add_bos_token=True)
    return str(folder)


@pytest.fixture(params=["sp", "hf"])
def tok(request, sp_dir, hf_dir):
    return Tokenizer.from_dir(sp_dir if request.param == "sp" else hf_dir, None)


def _stream(tok, ids, context=None):
    decoder = tok.stream_decoder(context)
    pieces = [decoder.push(i) for i in ids]
    return pieces, "".join(pieces) + decoder.flush()


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    pieces, joined = _stream(tok, ids)
    assert joined == text
    assert not any("\ufffd" in p for p in pieces)


def test_chinese_streams_whole_characters_token_by_token(tok):
    text = "台灣的首都是？"
    ids = tok.encode(text, add_bos=False)
    pieces, joined = _stream(tok, ids)
    assert joined == text
    assert "" in pieces  # some tokens carry part of a character and were held back
    assert all(p == "" or all(c in text for c in p) for p in pieces)


def test_flush_gives_what_was_held_back(tok):
    ids = tok.encode("鳥", add_bos=False)  # not in the training text: bytes
    assert len(ids) > 1
    decoder = tok.stream_decoder()
    assert [decoder.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)  # all held back
    assert decoder.flush().endswith("\ufffd")  # the unfinished character, as it stands


def test_sentencepiece_defaults(sp_dir):
    tok = Tokenizer.from_dir(sp_dir, None)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, [2], True)
    assert tok.chat_template is None and tok.vocab_size == 400
    assert tok.token_to_id("<s>") == 1 and tok.token_to_id("no such piece") is None
    assert tok.id_to_token(2) == "</s>" and tok.id_to_token(10**6) is None


def test_bos_added_once(tok):
    ids = tok.encode("hello")
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert tok.encode("hello", add_bos=False) == ids[1:]
    # a chat template that writes the BOS string itself does not get a second one
    bos_text = tok.id_to_token(tok.bos_id)
    assert tok.encode(bos_text + "hello") == ids


def test_special_token_strings_inside_sentencepiece_text(sp_dir):
    tok = Tokenizer.from_dir(sp_dir, None)
    ids = tok.encode("a</s>b", add_bos=False)
    # text after a special token gets sentencepiece's space prefix again, as in llama.cpp and
    # transformers' legacy Llama tokenizer
    assert ids[1] == 2 and ids[2] == tok.encode("b", add_bos=False)[0]
    assert tok.decode(ids) == "a b"


def test_decode_skips_only_bos_and_eos(tmp_path):
    t = make_tokenizer(320)
    t.add_special_tokens(["<|im_start|>"])
    t.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(str(tmp_path), _config(bos=0, eos=[1]))
    ids = tok.encode("<|im_start|>user\nhi", add_bos=True)
    assert ids[0] == 0 and ids[1] == t.token_to_id("<|im_start|>")
    assert tok.decode(ids + [1]) == "<|im_start|>user\nhi"


def test_add_bos_from_the_post_processor_when_the_config_is_silent(tmp_path):
    write_tokenizer(tmp_path, 320, add_bos_token=True)
    os.remove(tmp_path / "tokenizer_config.json")
    assert Tokenizer.from_dir(str(tmp_path), _config(bos=0)).add_bos is True
    assert Tokenizer.from_dir(str(tmp_path), None).add_bos is False  # no BOS known at all
    write_tokenizer(tmp_path, 320, add_bos_token=False)
    os.remove(tmp_path / "tokenizer_config.json")
    assert Tokenizer.from_dir(str(tmp_path), _config(bos=0)).add_bos is False


def test_ids_from_config_first_then_files(hf_dir, tmp_path):
    assert Tokenizer.from_dir(hf_dir, None).eos_ids == [1]
    tok = Tokenizer.from_dir(hf_dir, _config(bos=5, eos=[7, 8]))
    assert (tok.bos_id, tok.eos_ids) == (5, [7, 8])
    write_tokenizer(tmp_path, 320)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 9]}))
    assert Tokenizer.from_dir(str(tmp_path), None).eos_ids == [1, 9]


def test_tokenizer_config_false_add_bos_wins(tmp_path):
    train_sentencepiece(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": False, "bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    tok = Tokenizer.from_dir(str(tmp_path), None)
    assert tok.add_bos is False and tok.encode("hi")[0] != 1


def test_stream_context_gives_the_first_piece_its_space(sp_dir):
    tok = Tokenizer.from_dir(sp_dir, None)
    prompt = tok.encode("The capital of France is")
    reply = tok.encode("Paris.", add_bos=False)  # sentencepiece: '▁Paris' ...
    assert _stream(tok, reply)[1] == "Paris."
    assert _stream(tok, reply, context=prompt)[1] == " Paris."


def test_chat_template_sources(tmp_path):
    write_tokenizer(tmp_path, 320)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"},
                            {"name": "default", "template": "D"}]
    cfg_path.write_text(json.dumps(cfg))
    assert Tokenizer.from_dir(str(tmp_path), None).chat_template == "D"
    cfg["chat_template"] = "S"
    cfg_path.write_text(json.dumps(cfg))
    assert Tokenizer.from_dir(str(tmp_path), None).chat_template == "S"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert Tokenizer.from_dir(str(tmp_path), None).chat_template == "J"


# ---- errors -------------------------------------------------------------------------------
def test_no_tokenizer_names_the_folder(tmp_path):
    with pytest.raises(TokenizerError, match=f"no tokenizer in {tmp_path}"):
        Tokenizer.from_dir(str(tmp_path), None)


@pytest.mark.parametrize("name,content,message", [
    ("tokenizer.json", "{not json", "cannot read .*tokenizer.json"),
    ("tokenizer.model", "garbage", "cannot read .*tokenizer.model"),
])
def test_corrupt_tokenizer_file(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_dir(str(tmp_path), None)


@pytest.mark.parametrize("content,message", [("{oops", "is not valid JSON"),
                                             ("[1, 2]", "must hold a JSON object")])
def test_bad_tokenizer_config(tmp_path, content, message):
    write_tokenizer(tmp_path, 320)
    (tmp_path / "tokenizer_config.json").write_text(content)
    with pytest.raises(TokenizerError, match=f"tokenizer_config.json {message}"):
        Tokenizer.from_dir(str(tmp_path), None)


def test_encode_wants_text(tok):
    with pytest.raises(TokenizerError, match="encode\\(\\) takes a str, got list"):
        tok.encode([1, 2])
