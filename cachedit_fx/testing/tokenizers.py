"""Tokenizers built in code from tiny character-level vocabularies (no hub access).

Traps: a CLIP tokenizer built in code has ``model_max_length = 1e30`` and pipelines pad to it, so every
builder sets a real maximum length.
"""
from __future__ import annotations

import string

CHARS = list(string.ascii_lowercase + string.digits + " .,!?'-")


def clip_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    tok.model_max_length = max_length
    return tok


def t5_tokenizer(max_length: int = 512):
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(c, -1.0) for c in CHARS]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    tok.model_max_length = max_length
    return tok
