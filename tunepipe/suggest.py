"""'Did you mean' suggestions for a mistyped name: one rule for specs keys, settings and tokens."""
from __future__ import annotations

import difflib


def suggest(key: str, allowed: set[str] | list[str]) -> list[str]:
    close = difflib.get_close_matches(key, sorted(allowed), n=3, cutoff=0.6)
    return [f"did you mean '{c}'?" for c in close]
