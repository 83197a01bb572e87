"""A slow, obvious byte-level BPE (GPT-2's algorithm) written from the published recipes, to
check the tokenizer.json built from a GGUF vocabulary against something that shares no code
with it: split with the pre-tokenizer's regex, map bytes to GPT-2's printable characters, then
merge the best-ranked adjacent pair until none is left."""
from __future__ import annotations

import regex

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Meta's Llama 3 tokenizer.json Split pattern
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's encoder.py table: printable bytes map to themselves, the rest to 256 + n."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class ReferenceBPE:
    def __init__(self, tokens: list[str], merges: list[str], pre: str):
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
        self.pre = pre
        self.byte_char = bytes_to_unicode()

    def split(self, text: str) -> list[str]:
        if self.pre == "llama-bpe":
            return regex.findall(LLAMA3, text)
        if self.pre == "smollm":  # each digit alone, then GPT-2's regex on the rest
            parts = [p for p in regex.split(r"(\p{N})", text) if p]
            return [w for p in parts for w in regex.findall(GPT2_PATTERN, p)]
        return regex.findall(GPT2_PATTERN, text)

    def bpe(self, word: str) -> list[str]:
        if self.pre == "llama-bpe" and word in self.vocab:  # Llama 3 ignores merges for whole words
            return [word]
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), float("inf")), i)
                     for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, _ = min(pairs)
            if rank == float("inf"):
                break
            best = next(p for p in zip(parts, parts[1:]) if self.ranks.get(p) == rank)
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in self.split(text):
            mapped = "".join(self.byte_char[b] for b in word.encode("utf-8"))
            ids.extend(self.vocab[p] for p in self.bpe(mapped))
        return ids
