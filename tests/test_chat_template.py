"""Chat templates rendered as transformers renders them, sandboxed, with the end-of-turn token
found for stopping."""
import pytest

from tests.helpers.tiny_tokenizer import make_tokenizer
from utils.chat_template import (ChatTemplateError, end_of_turn_ids, end_of_turn_text,
                                 render_chat, render_for_tokenizer)
from utils.tokenizer import Tokenizer

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
          "Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
          "'<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
LLAMA2 = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + "
          "m['content'] + ' [/INST]' }}{% elif m['role'] == 'assistant' %}"
          "{{ ' ' + m['content'] + ' ' + eos_token }}{% else %}"
          "{{ raise_exception('Only user and assistant roles are supported!') }}"
          "{% endif %}{% endfor %}")
USER = [{"role": "user", "content": "What is the capital of France?"}]


def test_chatml_as_transformers_renders_it():
    assert render_chat(CHATML, USER, bos_token="<|im_start|>", eos_token="<|im_end|>") == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n")
    no_prompt = render_chat(CHATML, USER, bos_token="", eos_token="", add_generation_prompt=False)
    assert no_prompt.endswith("France?<|im_end|>\n")


def test_llama3_uses_bos_token_and_filters():
    text = render_chat(LLAMA3, [{"role": "user", "content": "  hi  "}],
                       bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_trim_blocks_lstrip_blocks_loop_controls_and_tojson():
    template = ("{% for m in messages %}\n    {% if m['role'] == 'system' %}{% continue %}"
                "{% endif %}\n{{ m['content'] | tojson }}\n{% endfor %}")
    messages = [{"role": "system", "content": "x"}, {"role": "user", "content": "台灣"}]
    assert render_chat(template, messages) == '"台灣"\n'


def test_raise_exception_becomes_a_clear_error():
    with pytest.raises(ChatTemplateError, match="refused the messages: Only user and assistant"):
        render_chat(LLAMA2, [{"role": "system", "content": "s"}], bos_token="<s>",
                    eos_token="</s>")


@pytest.mark.parametrize("template,message", [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "tried something unsafe"),
    ("{% for m in messages %}", "chat template is invalid \\(line 1\\)"),
    ("{{ messages[0]['content'] + 1 }}", "failed to render"),
    (None, "this model has no chat template"),
    ("", "this model has no chat template"),
])
def test_bad_templates(template, message):
    with pytest.raises(ChatTemplateError, match=message):
        render_chat(template, USER)


@pytest.mark.parametrize("messages", [[], "hi", [{"content": "no role"}], [{"role": "user"}]])
def test_bad_messages(messages):
    with pytest.raises(ChatTemplateError, match="message"):
        render_chat(CHATML, messages)


def test_sandbox_cannot_mutate_the_messages():
    template = "{{ messages.append({'role': 'x'}) }}"
    with pytest.raises(ChatTemplateError, match="unsafe"):
        render_chat(template, USER)


@pytest.mark.parametrize("template,want", [(CHATML, "<|im_end|>"), (LLAMA3, "<|eot_id|>"),
                                           (LLAMA2, "</s>"), ("{{ messages[0]['content'] }}", None),
                                           ("{% if", None)])
def test_end_of_turn_text(template, want):
    assert end_of_turn_text(template, bos_token="<s>", eos_token="</s>") == want


@pytest.fixture
def chatml_tokenizer(tmp_path):
    tok = make_tokenizer(320)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        '{"bos_token": "<s>", "eos_token": "</s>", "chat_template": %s}'
        % __import__("json").dumps(CHATML))
    return Tokenizer.from_dir(str(tmp_path), None)


def test_end_of_turn_ids_add_the_template_token_to_eos(chatml_tokenizer):
    im_end = chatml_tokenizer.token_to_id("<|im_end|>")
    assert end_of_turn_ids(chatml_tokenizer) == [1, im_end]


def test_render_for_tokenizer_then_encode(chatml_tokenizer):
    text = render_for_tokenizer(chatml_tokenizer, USER)
    ids = chatml_tokenizer.encode(text, add_bos=False)
    assert ids[0] == chatml_tokenizer.token_to_id("<|im_start|>")
    assert chatml_tokenizer.decode(ids) == text
