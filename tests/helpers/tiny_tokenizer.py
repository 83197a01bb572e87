"""A tiny byte-level BPE tokenizer.json (any text, CJK included, encodes without <unk>),
trained deterministically on a few sentences, with tokenizer_config.json naming BOS/EOS."""
from __future__ import annotations

import json
import os

BOS, EOS = "<s>", "</s>"
BOS_ID, EOS_ID = 0, 1

CORPUS = [
    "The capital of France is Paris. The capital of Taiwan is Taipei.",
    "Once upon a time there was a little llama who liked to run in the hills.",
    "def add(a, b):\n    return a + b\n",
    "台灣的首都是台北。日本的首都是東京。",
    "1 2 3 4 5 6 7 8 9 10, and then some more numbers: 42, 2025.",
    "Hello, world! How are you today? I am fine, thank you.",
]


def make_tokenizer(vocab_size: int = 320):
    """A tokenizers.Tokenizer with at most vocab_size tokens (256 bytes + BOS/EOS + merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise ValueError("a byte-level tokenizer needs vocab_size >= 258 (256 bytes + BOS/EOS)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    assert tok.token_to_id(BOS) == BOS_ID and tok.token_to_id(EOS) == EOS_ID
    assert tok.get_vocab_size() <= vocab_size
    return tok


def write_tokenizer(path, vocab_size: int = 320, add_bos_token: bool = True) -> None:
    """Write tokenizer.json + tokenizer_config.json into path. As in Llama 2's files, when
    add_bos_token is true tokenizer.json's post-processor prepends BOS too, so transformers'
    AutoTokenizer and the tokenizers library agree."""
    from tokenizers import processors

    tok = make_tokenizer(vocab_size)
    if add_bos_token:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)])
    tok.save(os.path.join(path, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
              "add_bos_token": add_bos_token, "add_eos_token": False,
              "model_max_length": 2048}
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
