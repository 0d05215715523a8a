"""Built-in tasks that lmtune generates itself, deterministically, with answers that can be checked exactly.

`dates`: rewrite a date written in one of several everyday English styles as ISO 8601 (YYYY-MM-DD).
Small models know month names but not the target format, so a short LoRA fine-tune moves exact match
from near zero to near perfect: the demo's before/after.
"""

from __future__ import annotations

import datetime as dt
import random

INSTRUCTION = "Rewrite this date in ISO 8601 format (YYYY-MM-DD). Answer with the date only."


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


STYLES = [
    lambda d: f"{d:%B} {d.day}, {d.year}",            # March 5, 2024
    lambda d: f"{d.day} {d:%B} {d.year}",              # 5 March 2024
    lambda d: f"{d:%b} {d.day}, {d.year}",             # Mar 5, 2024
    lambda d: f"the {_ordinal(d.day)} of {d:%B}, {d.year}",
    lambda d: f"{d:%B} {_ordinal(d.day)}, {d.year}",   # March 5th, 2024
    lambda d: f"{d:%A}, {d:%B} {d.day}, {d.year}",     # Tuesday, March 5, 2024
]


def date_records(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """`n` Alpaca records {instruction, input, output} with distinct inputs, none of them in `exclude`."""
    rng = random.Random(seed)
    start, span = dt.date(1950, 1, 1), (dt.date(2049, 12, 31) - dt.date(1950, 1, 1)).days
    rows, seen = [], set(exclude)
    while len(rows) < n:
        d = start + dt.timedelta(days=rng.randrange(span))
        text = rng.choice(STYLES)(d)
        if text in seen:
            continue
        seen.add(text)
        rows.append({"instruction": INSTRUCTION, "input": text, "output": d.isoformat()})
    return rows
