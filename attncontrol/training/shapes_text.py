"""The shapes models' text side: one place for the tokenizers and the small CLIP text encoder they train.

The vocabulary and prompt length are settings of each training config. The full CLIP BPE (49,408 tokens, 77
positions) is what the shipped SD-architecture model was trained with; shapes-world captions are at most ~20 tokens
of common words, so ``vocab_size=16384, max_length=32`` keeps every caption word a single token while shrinking the
embedding table (most of a small text encoder's weights) and the per-step text cost. Pipelines pick both up from
the saved tokenizer, so inference matches training.
"""

from __future__ import annotations

from attncontrol.testing.tiny import clip_text_config, clip_tokenizer, t5_tokenizer

TEXT_HIDDEN = 64


def shapes_clip_tokenizer(vocab_size: int, max_length: int):
    return clip_tokenizer(vocab_size=vocab_size, max_length=max_length)


def shapes_t5_tokenizer(vocab_size: int, max_length: int):
    return t5_tokenizer(vocab_size=vocab_size, max_length=max_length)


def shapes_clip_text_encoder(num_layers: int, vocab_size: int, max_length: int):
    """A CLIP text encoder (hidden 64) over the given vocabulary; causal, as in every SD/Flux pipeline."""
    from transformers import CLIPTextModel

    config = clip_text_config(
        TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        projection_dim=TEXT_HIDDEN,
        vocab_size=vocab_size,
        max_length=max_length,
        num_layers=num_layers,
    )
    return CLIPTextModel(config)
