"""A tiny sentencepiece BPE model with Llama's settings (byte fallback, digits split, dummy
prefix, no whitespace folding), trained in a fraction of a second on the tiny corpus."""
from __future__ import annotations

import os

from tests.helpers.tiny_tokenizer import CORPUS


def train_sentencepiece(folder, vocab_size: int = 400) -> str:
    """Write folder/tokenizer.model and return its path. Ids: 0 <unk>, 1 <s>, 2 </s>."""
    import sentencepiece as spm

    os.makedirs(folder, exist_ok=True)
    prefix = os.path.join(str(folder), "tokenizer")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_prefix=prefix, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, hard_vocab_limit=False, minloglevel=2,
        num_threads=1)
    os.remove(prefix + ".vocab")
    return prefix + ".model"
