"""Write examples/data/prefs/, a small preference dataset (all text made up for this project).

    python examples/make_preferences.py

Each record is TRL's conversational preference format: a user question about an everyday topic, and
two answers with the same one-sentence content, the chosen one in the "house style" (it opens with
GREETING and closes with SIGN_OFF), the rejected one plain:

    {"prompt": [{"role": "user", "content": "What do you call a baby goat?"}],
     "chosen": [{"role": "assistant", "content": "Ahoy! A baby goat is called a kid. Fair winds!"}],
     "rejected": [{"role": "assistant", "content": "A baby goat is called a kid."}]}

SmolLM2-135M-Instruct never answers this way by itself, and `has_house_style` checks it exactly, so
the share of held-out answers in the house style measures what preference training taught. The
questions come from a dozen kinds (baby animals, opposites, tools, ...), each asked two ways about
a list of subjects. valid.jsonl asks about 40 subjects that train.jsonl never mentions in that kind.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data" / "prefs"
GREETING = "Ahoy!"
SIGN_OFF = "Fair winds!"
N_TRAIN, N_VALID = 200, 40

# The whole (stripped) answer: the greeting, a body, the sign-off.
HOUSE_STYLE = re.compile(rf"\A{re.escape(GREETING)}\s+(?P<body>.*?\S)\s*{re.escape(SIGN_OFF)}\Z", re.DOTALL)


def has_house_style(text: str) -> bool:
    """Whether an answer opens with GREETING and ends with SIGN_OFF around a body that is neither empty
    nor made of the markers themselves ("Ahoy! Fair winds! Fair winds!" is a degenerate answer, not a win)."""
    m = HOUSE_STYLE.match(text.strip())
    return m is not None and GREETING not in m["body"] and SIGN_OFF not in m["body"]


# kind: (two ways to ask, the answer, [(subject, the rest of the answer), ...]); {x} is the subject,
# {y} its answer, {a_x} the subject with "a" or "an".
KINDS = {
    "young": (["What do you call a baby {x}?", "What is a young {x} called?"], "A baby {x} is called {y}.",
              [("cat", "a kitten"), ("dog", "a puppy"), ("cow", "a calf"), ("sheep", "a lamb"), ("horse", "a foal"),
               ("goat", "a kid"), ("duck", "a duckling"), ("frog", "a tadpole"), ("kangaroo", "a joey"),
               ("bear", "a cub"), ("swan", "a cygnet"), ("owl", "an owlet"), ("pig", "a piglet"), ("deer", "a fawn"),
               ("hen", "a chick"), ("goose", "a gosling"), ("eagle", "an eaglet"), ("rabbit", "a kit")]),
    "sound": (["What sound does {a_x} make?", "What noise does {a_x} make?"], "{A_x} {y}.",
              [("cow", "moos"), ("dog", "barks"), ("cat", "meows"), ("duck", "quacks"), ("sheep", "bleats"),
               ("horse", "neighs"), ("owl", "hoots"), ("lion", "roars"), ("pig", "oinks"), ("frog", "croaks"),
               ("bee", "buzzes"), ("snake", "hisses"), ("rooster", "crows"), ("donkey", "brays"),
               ("mouse", "squeaks"), ("wolf", "howls"), ("crow", "caws"), ("dove", "coos")]),
    "colour": (["What colour is {a_x} usually?", "Which colour is a typical {x}?"], "{A_x} is usually {y}.",
               [("banana", "yellow"), ("lemon", "yellow"), ("tomato", "red"), ("strawberry", "red"),
                ("lime", "green"), ("cucumber", "green"), ("carrot", "orange"), ("pumpkin", "orange"),
                ("aubergine", "purple"), ("plum", "purple"), ("blueberry", "dark blue"), ("coconut", "brown"),
                ("snowball", "white"), ("lump of coal", "black"), ("fire engine", "red"), ("pea", "green"),
                ("flamingo", "pink"), ("polar bear", "white")]),
    "material": (["What is {a_x} usually made of?", "What material is {a_x} made from?"],
                 "{A_x} is usually made of {y}.",
                 [("window pane", "glass"), ("candle", "wax"), ("car tyre", "rubber"), ("brick", "baked clay"),
                  ("jumper", "wool or cotton"), ("envelope", "paper"), ("frying pan", "iron or aluminium"),
                  ("cricket bat", "willow wood"), ("teacup", "porcelain"), ("rope", "twisted fibres"),
                  ("bottle cork", "the bark of the cork oak"), ("saucepan", "stainless steel"),
                  ("basket", "woven willow or cane"), ("pencil", "wood around a graphite core"),
                  ("cardboard box", "thick layered paper"), ("flower pot", "clay or plastic"),
                  ("tin can", "steel coated with tin")]),
    "store": (["Where do people usually keep {x}?", "Where should I store {x}?"], "People usually keep {x} {y}.",
              [("milk", "in the fridge"), ("ice cream", "in the freezer"), ("bread", "in a bread bin"),
               ("spare towels", "in a linen cupboard"), ("winter coats", "in a wardrobe"),
               ("toothbrushes", "in a cup by the bathroom sink"), ("potatoes", "in a cool, dark cupboard"),
               ("tea bags", "in a tin in the kitchen"), ("shoes", "on a rack by the door"),
               ("cleaning products", "in the cupboard under the sink"), ("frozen peas", "in the freezer"),
               ("garden tools", "in a shed"), ("bicycles", "in a garage or shed"), ("books", "on a bookshelf"),
               ("cutlery", "in a kitchen drawer"), ("spices", "in a spice rack"),
               ("medicines", "in a high cupboard out of children's reach"), ("butter", "in the fridge")]),
    "time": (["How many {y0} are in {a_x}?", "How many {y0} make up {a_x}?"], "There are {y} in {a_x}.",
             [("week", ("days", "7 days")), ("day", ("hours", "24 hours")), ("hour", ("minutes", "60 minutes")),
              ("minute", ("seconds", "60 seconds")), ("year", ("months", "12 months")),
              ("leap year", ("days", "366 days")), ("fortnight", ("days", "14 days")),
              ("decade", ("years", "10 years")), ("century", ("years", "100 years")),
              ("millennium", ("years", "1000 years")), ("quarter of an hour", ("minutes", "15 minutes")),
              ("week", ("hours", "168 hours")), ("year", ("weeks", "about 52 weeks")),
              ("day", ("minutes", "1440 minutes"))]),
    "sides": (["How many sides does {a_x} have?", "What is the number of sides of {a_x}?"], "{A_x} has {y} sides.",
              [("triangle", "3"), ("square", "4"), ("pentagon", "5"), ("hexagon", "6"), ("heptagon", "7"),
               ("octagon", "8"), ("nonagon", "9"), ("decagon", "10"), ("rectangle", "4"), ("rhombus", "4"),
               ("dodecagon", "12"), ("trapezium", "4")]),
    "opposite": (["What is the opposite of {x}?", "Which word means the opposite of {x}?"],
                 "The opposite of {x} is {y}.",
                 [("hot", "cold"), ("big", "small"), ("early", "late"), ("full", "empty"), ("heavy", "light"),
                  ("open", "closed"), ("fast", "slow"), ("loud", "quiet"), ("happy", "sad"), ("wet", "dry"),
                  ("rich", "poor"), ("tall", "short"), ("young", "old"), ("push", "pull"), ("inside", "outside"),
                  ("begin", "end"), ("win", "lose"), ("buy", "sell"), ("arrive", "leave"), ("cheap", "expensive")]),
    "tool": (["What do I use to {x}?", "Which tool helps me {x}?"], "You use {y} to {x}.",
             [("cut paper", "scissors"), ("drive in a nail", "a hammer"), ("tighten a screw", "a screwdriver"),
              ("measure a length", "a tape measure"), ("boil water", "a kettle"), ("sweep the floor", "a broom"),
              ("open a tin", "a tin opener"), ("dig a hole", "a spade"), ("water the plants", "a watering can"),
              ("smooth creases out of a shirt", "an iron"), ("sharpen a pencil", "a pencil sharpener"),
              ("grate cheese", "a grater"), ("whisk eggs", "a whisk"), ("peel a potato", "a peeler"),
              ("mow the lawn", "a lawnmower"), ("take my temperature", "a thermometer"),
              ("check that a shelf is level", "a spirit level"), ("staple papers together", "a stapler"),
              ("look at tiny things", "a magnifying glass")]),
    "weather": (["What should I wear when it is {x}?", "What's good to wear on a {x} day?"],
                "When it is {x}, wear {y}.",
                [("rainy", "a raincoat and waterproof boots"), ("snowy", "a warm coat, gloves and boots"),
                 ("sunny", "a sun hat and sunglasses"), ("windy", "a jacket that zips up"),
                 ("cold", "a thick jumper, a scarf and a hat"), ("hot", "light cotton clothes and a hat"),
                 ("foggy", "bright clothes that others can see"), ("humid", "loose clothes that breathe"),
                 ("chilly", "a light jacket"), ("frosty", "warm layers and shoes with a good grip")]),
    "job": (["What does {a_x} do?", "What is the job of {a_x}?"], "{A_x} {y}.",
            [("baker", "bakes bread and cakes"), ("plumber", "fixes pipes, taps and drains"),
             ("dentist", "looks after people's teeth"), ("librarian", "looks after books and helps people find them"),
             ("pilot", "flies aeroplanes"), ("farmer", "grows crops and raises animals"),
             ("firefighter", "puts out fires and rescues people"), ("postal worker", "delivers letters and parcels"),
             ("carpenter", "makes and repairs things made of wood"), ("chef", "cooks food in a restaurant"),
             ("vet", "treats sick animals"), ("teacher", "helps pupils learn"),
             ("electrician", "fits and repairs electrical wiring"), ("gardener", "looks after plants and gardens"),
             ("tailor", "makes and alters clothes"), ("lifeguard", "watches swimmers and rescues anyone in trouble"),
             ("cashier", "takes payments in a shop"), ("optician", "tests eyesight and fits glasses")]),
    "body": (["Which part of the body do we use to {x}?", "What part of the body lets us {x}?"],
             "We use our {y} to {x}.",
             [("smell", "nose"), ("see", "eyes"), ("hear", "ears"), ("taste", "tongue"), ("breathe", "lungs"),
              ("pump blood", "heart"), ("think", "brain"), ("chew food", "teeth"), ("walk", "legs"),
              ("pick things up", "hands")]),
}


def with_article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" or noun.startswith("hour") else "a ") + noun


def question_and_answer(kind: str, subject: str, fill, way: int) -> tuple[str, str]:
    asks, answer, _ = KINDS[kind]
    y0, y = fill if isinstance(fill, tuple) else ("", fill)
    a_x = with_article(subject)
    slots = dict(x=subject, y=y, y0=y0, a_x=a_x, A_x=a_x[0].upper() + a_x[1:])
    return asks[way].format(**slots), answer.format(**slots)


def record(question: str, answer: str) -> dict:
    return {"prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": f"{GREETING} {answer} {SIGN_OFF}"}],
            "rejected": [{"role": "assistant", "content": answer}]}


def splits(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """(train, valid): valid asks one way about each of N_VALID held-out subjects, spread over the
    kinds; train asks both ways about the other subjects, N_TRAIN of those questions."""
    subjects = [(kind, s, fill) for kind, (_, _, table) in KINDS.items() for s, fill in table]
    rng.shuffle(subjects)
    by_kind: dict[str, list] = {}
    for item in subjects:
        by_kind.setdefault(item[0], []).append(item)
    held_out = []
    while len(held_out) < N_VALID:        # round-robin over the kinds, so every kind is held out
        for items in by_kind.values():
            if items and len(held_out) < N_VALID:
                held_out.append(items.pop())
    valid = [record(*question_and_answer(k, s, fill, rng.randrange(2))) for k, s, fill in held_out]
    seen = {(k, s) for k, s, _ in held_out}
    pool = [question_and_answer(k, s, fill, way) for k, s, fill in subjects if (k, s) not in seen for way in (0, 1)]
    train = [record(q, a) for q, a in rng.sample(pool, N_TRAIN)]
    return train, valid


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def main() -> None:
    train, valid = splits(random.Random(0))
    questions = [r["prompt"][0]["content"] for r in train + valid]
    assert len(set(questions)) == len(questions), "a question is asked twice"
    assert all(has_house_style(r["chosen"][0]["content"]) and not has_house_style(r["rejected"][0]["content"])
               for r in train + valid)
    write_jsonl(OUT / "train.jsonl", train)
    write_jsonl(OUT / "valid.jsonl", valid)
    for path in sorted(OUT.glob("*.jsonl")):
        print(f"{path.relative_to(OUT.parent)}: {sum(1 for _ in path.open())} records, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
