"""n-gram prompt lookup: propose what followed the latest earlier occurrence of the sequence's last n tokens.

No second model: a sequence that repeats or edits text it has seen (code edits, summaries quoting the
prompt, "repeat after me") continues a match most of the time, and a miss costs only the verify rows.
"""

from __future__ import annotations


def propose_ngram(token_ids: list[int], k: int, n_max: int, n_min: int) -> list[int]:
    """Up to `k` tokens: the continuation of the latest match of the longest suffix n-gram (n_max down to
    n_min) found earlier in `token_ids`; [] when nothing matches."""
    length = len(token_ids)
    if k <= 0:
        return []
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        pattern = token_ids[length - n :]
        first = pattern[0]
        # The latest start whose n tokens are followed by at least one token, before the suffix itself.
        for start in range(length - n - 1, -1, -1):
            if token_ids[start] == first and token_ids[start : start + n] == pattern:
                return token_ids[start + n : start + n + k]
    return []
