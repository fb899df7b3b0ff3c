"""Close names for a word that matched nothing: the one "did you mean" of every error message.

Pure: ``difflib`` over the candidates the caller gives (fields, schemes, experiments, runs,
files), so a typo gets the same kind of hint wherever it is made.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

# difflib's default cutoff (0.6) misses short typos such as 'fold' for 'fold_idx'.
_CUTOFF = 0.5


def close_names(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` of ``candidates`` that look like ``word``, closest first.

    Case is ignored for the comparison; a candidate that starts with ``word`` (or that
    ``word`` starts with) counts as close whatever the ratio, so ``fold`` finds
    ``fold_idx``.
    """
    unique = list(dict.fromkeys(c for c in candidates if c and c != word))
    lowered = {c.lower(): c for c in unique}
    found = difflib.get_close_matches(word.lower(), list(lowered), n=n, cutoff=_CUTOFF)
    picked = [lowered[f] for f in found]
    if len(picked) < n and len(word) >= 3:
        key = word.lower()
        for candidate in unique:
            low = candidate.lower()
            if candidate not in picked and (
                low.startswith(key) or (len(low) >= 3 and key.startswith(low))
            ):
                picked.append(candidate)
            if len(picked) >= n:
                break
    return picked


def did_you_mean(word: str, candidates: Iterable[str], n: int = 3) -> str:
    """``"did you mean 'x'?"`` (or ``"did you mean 'x' or 'y'?"``), or ``""`` when none is close."""
    found = close_names(word, candidates, n)
    if not found:
        return ""
    quoted = [repr(f) for f in found]
    choice = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
    return f"did you mean {choice}?"
