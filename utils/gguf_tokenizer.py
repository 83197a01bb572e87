"""A GGUF file's vocabulary (tokenizer.ggml.* metadata) as tokenizer.json + tokenizer_config.json.

Two vocabulary kinds, tokenised the way llama.cpp tokenises them:
  "gpt2"  byte-level BPE from tokens + merges, split first by the regex tokenizer.ggml.pre names;
  "llama" sentencepiece-style: llama.cpp merges adjacent pieces by the score of the merged piece
          (whatever the original model type was), with <0xNN> byte fallback; that is a BPE
          whose merge ranks are the scores, as Hugging Face's LlamaTokenizerFast builds it.
"""
from __future__ import annotations

import json
import os

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from utils.checkpoint import atomic_path
from utils.tokenizer import TOKENIZER_CONFIG, TOKENIZER_JSON, TokenizerError

# llama.cpp's token types (llama_token_type / gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Meta's Llama-3 split regex, as in its tokenizer.json and llama.cpp's LLAMA3 pre-tokenizer
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gpt2_pre(pre: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("default", "gpt-2", "gpt2"):
        return byte_level, False
    if pre in ("smollm", "starcoder", "refact"):  # digits one by one, then GPT-2's regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        byte_level]), False
    if pre in ("llama-bpe", "llama3", "llama-v3"):
        split = pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False)
        no_regex = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        return pre_tokenizers.Sequence([split, no_regex]), True  # llama.cpp ignores merges here
    raise TokenizerError(f"GGUF pre-tokenizer 'tokenizer.ggml.pre' = {pre!r} is not supported "
                         f"(supported: default, gpt2, smollm, starcoder, refact, llama-bpe)")


def build_tokenizer(meta: dict) -> HFTokenizer:
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise TokenizerError("GGUF file has no vocabulary (tokenizer.ggml.tokens)")
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if kind == "gpt2":
        tok = _build_bpe(meta, tokens)
    elif kind == "llama":
        tok = _build_spm(meta, tokens, types)
    else:
        raise TokenizerError(f"GGUF tokenizer model 'tokenizer.ggml.model' = {kind!r} is not "
                             f"supported (supported: gpt2, llama)")
    _add_special(tok, tokens, types)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if add_bos_default(meta) and bos is not None and bos < len(tokens):
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B",
            special_tokens=[(tokens[bos], bos)])
    return tok


def _build_bpe(meta: dict, tokens: list[str]) -> HFTokenizer:
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        raise TokenizerError("GGUF gpt2 vocabulary has no merges (tokenizer.ggml.merges)")
    pre, ignore_merges = _gpt2_pre(meta.get("tokenizer.ggml.pre", "default"))
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab, pairs, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    return tok


def _build_spm(meta: dict, tokens: list[str], types: list[int]) -> HFTokenizer:
    scores = list(meta.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))])
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    unk_token = tokens[unk] if unk is not None and unk < len(tokens) else None
    tok = HFTokenizer(models.BPE(vocab, _spm_merges(tokens, types, scores, vocab),
                                 unk_token=unk_token, fuse_unk=True, byte_fallback=True))
    space_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    # llama.cpp puts the space before every run of text after a special token, as this does
    steps = [normalizers.Prepend("▁")] if space_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
    return tok


def _spm_merges(tokens, types, scores, vocab) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces of the vocabulary, best merged score first."""
    ranked = []
    for merged_id, piece in enumerate(tokens):
        if types[merged_id] not in (NORMAL, USER_DEFINED) or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[merged_id], merged_id, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(r[4], r[5]) for r in ranked]


def _add_special(tok: HFTokenizer, tokens: list[str], types: list[int]) -> None:
    """Control tokens are special (skipped by skip_special_tokens); user-defined ones are not.
    Both are matched whole in raw text, as llama.cpp does."""
    control = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty == CONTROL]
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)


def add_bos_default(meta: dict) -> bool:
    """tokenizer.ggml.add_bos_token when written; otherwise llama.cpp's default per vocabulary."""
    value = meta.get("tokenizer.ggml.add_bos_token")
    if isinstance(value, bool):
        return value
    return meta.get("tokenizer.ggml.model") == "llama" or meta.get("tokenizer.ggml.pre") in (
        "llama-bpe", "llama3", "llama-v3")


def end_of_generation_ids(meta: dict) -> list[int]:
    """EOS plus llama.cpp's other end-of-generation tokens (end of turn, end of message)."""
    ids = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    return ids


def tokenizer_config(meta: dict) -> dict:
    tokens = meta["tokenizer.ggml.tokens"]

    def piece(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    config = {"add_bos_token": add_bos_default(meta), "add_eos_token": False,
              "bos_token": piece("bos_token_id"), "eos_token": piece("eos_token_id"),
              "unk_token": piece("unknown_token_id"), "pad_token": piece("padding_token_id")}
    config = {k: v for k, v in config.items() if v is not None}
    if isinstance(meta.get("tokenizer.chat_template"), str):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


def write_tokenizer_files(meta: dict, out_dir: str) -> None:
    """tokenizer.json and tokenizer_config.json in out_dir, each written atomically."""
    tok = build_tokenizer(meta)
    os.makedirs(out_dir, exist_ok=True)
    with atomic_path(os.path.join(out_dir, TOKENIZER_JSON)) as tmp:
        tok.save(tmp)
    with atomic_path(os.path.join(out_dir, TOKENIZER_CONFIG)) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(tokenizer_config(meta), f, indent=2, ensure_ascii=False)


__all__ = ["build_tokenizer", "tokenizer_config", "write_tokenizer_files", "add_bos_default",
           "end_of_generation_ids", "LLAMA3_PATTERN"]
