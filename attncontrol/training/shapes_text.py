"""The shapes models' text side: one place for the vocabulary, the prompt length and the text-encoder size.

Shapes-world captions are at most ~20 CLIP tokens and use only common words, so both shipped models keep CLIP's
first 16,384 BPE tokens (every caption word is still a single token) and encode prompts to 32 positions instead of
77. That shrinks the embedding tables (most of a small text encoder's weights) and the per-step text cost, and the
pipelines pick both up from the saved tokenizer, so inference matches training.
"""

from __future__ import annotations

from attncontrol.testing.tiny import clip_text_config, clip_tokenizer, t5_tokenizer

VOCAB_SIZE = 16384
MAX_LENGTH = 32
TEXT_HIDDEN = 64


def shapes_clip_tokenizer():
    return clip_tokenizer(vocab_size=VOCAB_SIZE, max_length=MAX_LENGTH)


def shapes_t5_tokenizer():
    return t5_tokenizer(vocab_size=VOCAB_SIZE, max_length=MAX_LENGTH)


def shapes_clip_text_encoder(num_layers: int):
    """A CLIP text encoder (hidden 64) over the shapes vocabulary; causal, as in every SD/Flux pipeline."""
    from transformers import CLIPTextModel

    config = clip_text_config(
        TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        projection_dim=TEXT_HIDDEN,
        vocab_size=VOCAB_SIZE,
        max_length=MAX_LENGTH,
        num_layers=num_layers,
    )
    return CLIPTextModel(config)
