from __future__ import annotations

import pytest

from attncontrol import TokenIndexError, token_indices
from attncontrol.testing import clip_tokenizer, t5_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


def test_clip_tokenizer_is_the_real_bpe(tokenizer):
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_words_and_phrases_map_to_positions(tokenizer):
    prompt = "a red circle and a blue square"
    assert token_indices(tokenizer, prompt, "red") == [2]
    assert token_indices(tokenizer, prompt, "blue square") == [6, 7]
    assert token_indices(tokenizer, prompt, "a") == [1, 5]
    assert token_indices(tokenizer, prompt, ["red", 3]) == [2, 3]


def test_index_outside_the_prompt_is_an_error(tokenizer):
    with pytest.raises(TokenIndexError, match=r"`token` index 6 is outside the prompt 'a red circle'.*0\.\.4"):
        token_indices(tokenizer, "a red circle", 6)
    with pytest.raises(TokenIndexError, match="phrase 'green' does not occur"):
        token_indices(tokenizer, "a red circle", "green")


def test_t5_tokenizer_works_offline():
    ids = t5_tokenizer()("a red circle").input_ids
    assert ids[-1] == 1 and 2 not in ids  # ends with </s>, no unknown pieces
    assert token_indices(t5_tokenizer(), "a red circle", "red") == [1]


def test_truncated_clip_vocabulary_is_a_consistent_smaller_bpe(tokenizer):
    small = clip_tokenizer(vocab_size=16384, max_length=32)
    assert len(small) == 16384 and small.model_max_length == 32
    prompt = "a red circle on the left and a yellow triangle on the right"
    # Words whose merges are all kept get the same ids; only the specials move to the end of the smaller table.
    assert small(prompt).input_ids[1:-1] == tokenizer(prompt).input_ids[1:-1]
    assert small(prompt).input_ids[0] == 16382 and small(prompt).input_ids[-1] == 16383
    # A rare word still tokenizes, into more pieces, all inside the table.
    rare = small("photosynthesis").input_ids
    assert len(rare) > len(tokenizer("photosynthesis").input_ids) and max(rare) < 16384
    assert token_indices(small, prompt, "yellow triangle") == [9, 10]
    with pytest.raises(ValueError, match="`vocab_size` must be at least 1024"):
        clip_tokenizer(vocab_size=100)


def test_truncated_t5_vocabulary_keeps_common_words():
    small = t5_tokenizer(vocab_size=16384, max_length=32)
    assert len(small) < len(t5_tokenizer()) and small.model_max_length == 32
    assert 2 not in small("a green square at the bottom on a black background").input_ids
