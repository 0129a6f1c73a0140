"""The n-gram proposer (prompt lookup decoding): find the request's last n tokens earlier in
its prompt and output, and propose the tokens that followed them there.

Pure Python over token ids (no model, no device). The longest n in
[prompt_lookup_min, prompt_lookup_max] that matches wins; among its matches the latest one
(the most recent context is the likeliest to repeat). Cost: O(L * n) per request per step for
a sequence of L tokens, on the host; worth it because it is far below a forward pass up to
contexts of many thousand tokens.
"""

from __future__ import annotations

from collections.abc import Sequence


def propose_ngram(tokens: Sequence[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to `k` draft tokens continuing `tokens`, or [] when no n-gram recurs."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        tail = list(tokens[length - n :])
        first = tail[0]
        # latest match first; a match must leave at least one token after it
        for start in range(length - n - 1, -1, -1):
            if tokens[start] == first and list(tokens[start : start + n]) == tail:
                follow = start + n
                return list(tokens[follow : min(follow + k, length)])
    return []
