"""The real-model experiment's world: one- and two-step word problems about counting things, each with a
worked reference solution, for SmolLM2-135M-Instruct (opsd/demo/real.py).

    Mia has 14 stickers. She buys 7 more, then gives away 5. How many stickers does Mia have now?
    reference: Mia starts with 14 stickers. Buying 7 more gives 14 + 7 = 21. Giving away 5 leaves 21 - 5 = 16.
               The answer is 16.

Numbers stay small (starts 2–20, changes 1–9) and every count stays positive: SmolLM2-135M's own
arithmetic is weak (18 − 4 = 12, 16 + 15 = 29 in its answers to a first world of starts up to 30 and
changes up to 15, where it got 7.5% right after the warm-up). One step is a gain or a loss; two steps are two
of them in a row. Problems are drawn from a seeded generator; the held-out set is drawn first and the
training sets exclude its texts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ("Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Leo", "Emma", "Noah", "Ava", "Max", "Zoe")
PRONOUNS = {"Tom": "He", "Sam": "He", "Ben": "He", "Leo": "He", "Noah": "He", "Max": "He"}
THINGS = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "shells", "cards", "coins")
GAINS = (("buys {n} more", "Buying {n} more gives"), ("finds {n} more", "Finding {n} more gives"),
         ("gets {n} more", "Getting {n} more gives"))
LOSSES = (("gives away {n}", "Giving away {n} leaves"), ("loses {n}", "Losing {n} leaves"),
          ("eats {n}", "Eating {n} leaves"), ("sells {n}", "Selling {n} leaves"))
HELD_OUT = 120  # problems, half one-step, half two-step
HELD_OUT_SEED = 1_000_003


def problem(rng: random.Random, steps: int) -> dict:
    """One problem with `steps` changes: its text, worked reference solution, answer and level."""
    name, things = rng.choice(NAMES), rng.choice(THINGS)
    if things == "cookies":
        losses = LOSSES
    else:
        losses = tuple(loss for loss in LOSSES if not loss[0].startswith("eats"))
    count = start = rng.randint(2, 20)
    clauses, worked = [], [f"{name} starts with {count} {things}."]
    for _ in range(steps):
        change = rng.randint(1, 9)
        if rng.random() < 0.5 or count - change < 1:
            verb, explain = rng.choice(GAINS)
            new = count + change
            worked.append(f"{explain.format(n=change)} {count} + {change} = {new}.")
        else:
            verb, explain = rng.choice(losses)
            new = count - change
            worked.append(f"{explain.format(n=change)} {count} - {change} = {new}.")
        clauses.append(verb.format(n=change))
        count = new
    pronoun = PRONOUNS.get(name, "She")
    text = f"{name} has {start} {things}. {pronoun} {', then '.join(clauses)}. How many {things} does {name} have now?"
    worked.append(f"The answer is {count}.")
    return {"problem": text, "solution": " ".join(worked), "answer": str(count), "level": f"{steps}-step"}


def held_out() -> list[dict]:
    rng = random.Random(HELD_OUT_SEED)
    rows, seen = [], set()
    for steps in (1, 2):
        while sum(row["level"] == f"{steps}-step" for row in rows) < HELD_OUT // 2:
            row = problem(rng, steps)
            if row["problem"] not in seen:
                seen.add(row["problem"])
                rows.append(row)
    return [{"id": f"heldout_{i:03d}", **row} for i, row in enumerate(rows)]


def problems(count: int, seed: int, exclude: set[str], prefix: str) -> list[dict]:
    """`count` distinct problems, half one-step and half two-step, none of whose texts is in `exclude`."""
    rng = random.Random(seed)
    rows, seen = [], set(exclude)
    while len(rows) < count:
        row = problem(rng, 1 + len(rows) % 2)
        if row["problem"] not in seen:
            seen.add(row["problem"])
            rows.append({"id": f"{prefix}_{len(rows):05d}", **row})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
