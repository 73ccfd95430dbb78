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


def gemma_tokenizer(max_length: int = 512):
    """Gemma (Sana, Lumina2): an empty-merges BPE over single characters; upper case and ``<>`` are
    kept so Lumina2's ``<Prompt Start>`` separator is not all ``<unk>``."""
    from transformers import GemmaTokenizer

    chars = list(string.ascii_letters + string.digits + " .,!?'-<>:")
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "▁"]
    tok = GemmaTokenizer(vocab={t: i for i, t in enumerate(specials + chars)}, merges=[], add_bos_token=True)
    tok.model_max_length = max_length
    return tok


def _byte_level_vocab(specials):
    """Specials first, then the 256 byte-level symbols: every string tokenizes, one token a byte."""
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {s: i for i, s in enumerate(specials)}
    for c in sorted(ByteLevel.alphabet()):
        vocab.setdefault(c, len(vocab))
    return vocab


def qwen2_tokenizer(specials=("<|im_start|>", "<|im_end|>"), max_length: int = 1024, chat_template=None):
    """Qwen2 (Qwen-Image, Z-Image): byte-level BPE without merges. The chat markers must be special
    tokens, or a prompt template's token count (Qwen-Image's drop index) depends on their spelling."""
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer(vocab=_byte_level_vocab(["<|endoftext|>", *specials]), merges=[])
    tok.add_special_tokens({"additional_special_tokens": list(specials)})
    tok.model_max_length = max_length
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def llama_tokenizer(specials=(), max_length: int = 1024):
    """Llama (HunyuanVideo, HiDream): characters plus byte-fallback tokens, so newlines and capitals
    are kept rather than silently dropped. Pads on the right with ``</s>``: HunyuanVideo crops the
    template off the front of the padded sequence."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3}
    for c in string.printable.replace(" ", ""):
        vocab.setdefault(c, len(vocab))
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = LlamaTokenizer(vocab=vocab, merges=[], pad_token="</s>", padding_side="right")
    if specials:
        tok.add_special_tokens({"additional_special_tokens": list(specials)})
    tok.model_max_length = max_length
    return tok


def glm_tokenizer(max_length: int = 1024):
    """GLM-4 (CogView4): transformers has no GLM tokenizer class, so a byte-level ``tokenizers`` BPE is
    wrapped in ``PreTrainedTokenizerFast``; CogView4 left-pads with ``pad_token_id``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab=_byte_level_vocab(["<|endoftext|>"]), merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|endoftext|>")
    tok.model_max_length = max_length
    return tok
