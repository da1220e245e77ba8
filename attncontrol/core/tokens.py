"""Token positions of words and phrases in a prompt, with errors that say what the prompt holds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from attncontrol.core.errors import TokenIndexError

TokenSelector = int | str | Sequence[int | str]


def prompt_token_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Ids of ``prompt`` with the tokenizer's special tokens, unpadded and truncated like the pipeline does."""
    return list(tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids)


def token_indices(tokenizer: Any, prompt: str, selector: TokenSelector, *, name: str = "token") -> list[int]:
    """Positions in the encoded prompt that ``selector`` names.

    ``selector`` is an index into the encoded prompt (specials included: for CLIP, 0 is the start token and the
    first word is 1), a word or phrase of the prompt (every occurrence is returned), or a list of those.
    """
    ids = prompt_token_ids(tokenizer, prompt)
    selectors = [selector] if isinstance(selector, (int, str)) else list(selector)
    if not selectors:
        raise TokenIndexError(f"`{name}` is empty; name at least one token index or phrase")
    found: list[int] = []
    for item in selectors:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise TypeError(f"`{name}` entries must be ints or strings, got {item!r}")
        if isinstance(item, int):
            if not 0 <= item < len(ids):
                words = tokenizer.convert_ids_to_tokens(ids)
                raise TokenIndexError(
                    f"`{name}` index {item} is outside the prompt {prompt!r}, which encodes to {len(ids)} tokens "
                    f"(valid indices 0..{len(ids) - 1}: {words})"
                )
            found.append(item)
            continue
        phrase = tokenizer(item, add_special_tokens=False).input_ids
        starts = [i for i in range(len(ids) - len(phrase) + 1) if phrase and ids[i : i + len(phrase)] == phrase]
        if not starts:
            raise TokenIndexError(f"`{name}` phrase {item!r} does not occur in the prompt {prompt!r}")
        for start in starts:
            found.extend(range(start, start + len(phrase)))
    return sorted(set(found))
