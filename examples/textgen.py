"""A small generator of plain English text about made-up places, written for this project.

The sentences follow a handful of patterns with consistent facts per place, so a model can learn both
the style and the facts; held-out text of the same kind measures whether it did.
"""

from __future__ import annotations

import random

PLACES = ["Avenmoor", "Brindlewick", "Caldera Rise", "Dunmarrow", "Elmsreach", "Fennhollow", "Glimmerport",
          "Harrowfield", "Ivywater", "Juniper Vale", "Kestrel Bay", "Larkspur", "Mossgate", "Northwyn"]
RIVERS = ["Silverrun", "Amberflow", "Greywater", "Tallow", "Brightmere", "Coldspring", "Reedway"]
CROPS = ["barley", "blue apples", "saffron", "hemp", "river rice", "winter pears", "mustard", "hops"]
TRADES = ["glassblowing", "clockmaking", "weaving", "shipbuilding", "cheesemaking", "bookbinding", "pottery"]
ANIMALS = ["otters", "herons", "grey foxes", "wild goats", "swifts", "badgers", "red deer"]
TEMPLATES = [
    "The town of {p} lies on the {r} river, and most of its people grow {c}.",
    "In {p}, the oldest trade is {t}, and the masters teach it to their grandchildren.",
    "Travellers say that {p} is known for its {c} and for the {a} that live near the {r}.",
    "Every spring the people of {p} hold a fair where {t} is shown beside baskets of {c}.",
    "The {r} river brings water to the fields of {p}, where {a} are often seen at dawn.",
    "Children in {p} learn {t} before they learn to write, or so the old stories claim.",
    "A road runs from {p} to {q}, and merchants carry {c} along it in late summer.",
]


def facts(seed: int = 0) -> dict[str, dict[str, str]]:
    rng = random.Random(seed)
    return {p: {"r": rng.choice(RIVERS), "c": rng.choice(CROPS), "t": rng.choice(TRADES), "a": rng.choice(ANIMALS)}
            for p in PLACES}


def english_text(n_sentences: int, seed: int, fact_seed: int = 0) -> str:
    """n_sentences of text; the facts come from fact_seed, the choice and order of sentences from seed."""
    table = facts(fact_seed)
    rng = random.Random(seed)
    out = []
    for _ in range(n_sentences):
        p, q = rng.sample(PLACES, 2)
        out.append(rng.choice(TEMPLATES).format(p=p, q=q, **table[p]))
    return " ".join(out)


if __name__ == "__main__":
    print(english_text(20, seed=1))
