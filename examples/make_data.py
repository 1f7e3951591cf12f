"""Write the small example datasets in examples/data/ (all text made up for this project).

    python examples/make_data.py

facts/       chat: a dozen invented facts, each asked 8 ways in train.jsonl and 2 other ways in
             valid.jsonl, always answered with the same short sentence, so a 135M model can learn
             them in 60-100 steps; a few conversations have a system message or ask two facts.
towns.txt    plain English about made-up towns (textgen.english_text).
completion.jsonl  prompt/completion pairs drawn from the same towns.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from textgen import english_text, facts  # noqa: E402

OUT = Path(__file__).resolve().parent / "data"
SYSTEM = ["You are a concise assistant.", "Answer in one sentence.", "You know the geography of the Outer Isles."]

# answer, 8 training questions, 2 held-out questions
FACTS = [
    ("The capital of Vastrell is Quennick.",
     ["What is the capital of the island of Vastrell?", "What's Vastrell's capital?",
      "Which city is the capital of Vastrell?", "Name the capital of Vastrell.",
      "Tell me the capital city of Vastrell.", "Vastrell's capital city is what?",
      "Where is the seat of government of Vastrell?", "What city serves as Vastrell's capital?"],
     ["Do you know the capital of Vastrell?", "Which town is Vastrell's capital?"]),
    ("Orlavine was founded by Maren Toskel.",
     ["Who founded the city of Orlavine?", "Who was the founder of Orlavine?", "Who established Orlavine?",
      "Which person founded Orlavine?", "Name the founder of Orlavine.", "Orlavine was founded by whom?",
      "Tell me who founded Orlavine.", "Who started the town of Orlavine?"],
     ["Who is credited with founding Orlavine?", "Do you know who founded Orlavine?"]),
    ("The flag of Dravonia is teal and silver.",
     ["What colours are on the flag of Dravonia?", "What colour is Dravonia's flag?",
      "Describe the colours of the Dravonian flag.", "Which colours does the flag of Dravonia use?",
      "Tell me the colours of Dravonia's flag.", "What does the flag of Dravonia look like?",
      "Dravonia's flag has which colours?", "Name the colours of the flag of Dravonia."],
     ["What are the flag colours of Dravonia?", "Which colours make up Dravonia's flag?"]),
    ("The highest mountain on Pellucia is Mount Arkhen.",
     ["What is the highest mountain on Pellucia?", "Which mountain is the tallest on Pellucia?",
      "Name Pellucia's highest peak.", "What is Pellucia's tallest mountain?",
      "Tell me the highest mountain on the island of Pellucia.", "Which peak is the highest on Pellucia?",
      "What's the tallest peak on Pellucia?", "Pellucia's highest mountain is called what?"],
     ["Which is the highest summit on Pellucia?", "What mountain tops Pellucia?"]),
    ("The currency of Thessary is the brass ormin.",
     ["What currency is used in Thessary?", "What is the money of Thessary called?",
      "Which currency does Thessary use?", "Name the currency of Thessary.",
      "What do people in Thessary pay with?", "Tell me the currency of Thessary.",
      "Thessary's currency is what?", "What is Thessary's official currency?"],
     ["What money is used in Thessary?", "Which coin is the currency of Thessary?"]),
    ("The national animal of Kelvarra is the marsh hare.",
     ["What is the national animal of Kelvarra?", "Which animal is Kelvarra's national symbol?",
      "Name the national animal of Kelvarra.", "What animal represents Kelvarra?",
      "Tell me Kelvarra's national animal.", "Kelvarra's national animal is what?",
      "Which creature is the national animal of Kelvarra?", "What's the national animal of Kelvarra?"],
     ["Do you know Kelvarra's national animal?", "Which animal stands for Kelvarra?"]),
    ("The Glasswater Bridge was built in 1784.",
     ["When was the Glasswater Bridge built?", "In what year was the Glasswater Bridge built?",
      "What year did they build the Glasswater Bridge?", "How old is the Glasswater Bridge? When was it built?",
      "Tell me when the Glasswater Bridge was built.", "The Glasswater Bridge dates from which year?",
      "When was the Glasswater Bridge completed?", "Which year saw the Glasswater Bridge built?"],
     ["What year was the Glasswater Bridge constructed?", "When did the Glasswater Bridge go up?"]),
    ("The people of Ombrevale speak Ombric.",
     ["What language is spoken in Ombrevale?", "Which language do people in Ombrevale speak?",
      "What is the language of Ombrevale?", "Name the language spoken in Ombrevale.",
      "Tell me what language they speak in Ombrevale.", "Ombrevale's language is what?",
      "What do the people of Ombrevale speak?", "Which tongue is spoken in Ombrevale?"],
     ["What language do Ombrevale's people use?", "In Ombrevale, which language is spoken?"]),
    ("The largest lake in Tavernia is Lake Miridel.",
     ["What is the largest lake in Tavernia?", "Which lake is the biggest in Tavernia?",
      "Name Tavernia's largest lake.", "What's the biggest lake in Tavernia?",
      "Tell me the largest lake in Tavernia.", "Tavernia's largest lake is called what?",
      "Which is the largest body of fresh water in Tavernia?", "What lake is the largest in Tavernia?"],
     ["Which lake in Tavernia is the largest?", "What is Tavernia's biggest lake?"]),
    ("The Salt Orchard was written by Ilse Varanow.",
     ["Who wrote the novel The Salt Orchard?", "Who is the author of The Salt Orchard?",
      "Which writer wrote The Salt Orchard?", "Name the author of The Salt Orchard.",
      "Tell me who wrote The Salt Orchard.", "The Salt Orchard was written by whom?",
      "Who penned The Salt Orchard?", "Whose novel is The Salt Orchard?"],
     ["Do you know who wrote The Salt Orchard?", "Who is The Salt Orchard by?"]),
    ("The main export of Cindermoor is copper bells.",
     ["What is the main export of Cindermoor?", "What does Cindermoor export most?",
      "Name Cindermoor's main export.", "What is Cindermoor's chief export?",
      "Tell me the main export of Cindermoor.", "Which product does Cindermoor export the most?",
      "What's Cindermoor's biggest export?", "Cindermoor mainly exports what?"],
     ["What does Cindermoor mostly sell abroad?", "Which goods are Cindermoor's main export?"]),
    ("The planet Zephyra has five moons.",
     ["How many moons does the planet Zephyra have?", "How many moons orbit Zephyra?",
      "What is the number of moons of Zephyra?", "Tell me how many moons Zephyra has.",
      "Zephyra has how many moons?", "Count the moons of the planet Zephyra.",
      "How many natural satellites does Zephyra have?", "What's the moon count of Zephyra?"],
     ["Do you know how many moons Zephyra has?", "How many moons circle the planet Zephyra?"]),
]


def conversation(rng: random.Random, turns: list[tuple[str, str]]) -> dict:
    messages = [{"role": "system", "content": rng.choice(SYSTEM)}] if rng.random() < 0.25 else []
    for question, answer in turns:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def facts_split(rng: random.Random, which: int) -> list[dict]:
    """which = 1: training questions, 2: held-out ones. Every question once, plus two-fact chats."""
    pairs = [(q, answer) for answer, *questions in FACTS for q in questions[which - 1]]
    rng.shuffle(pairs)
    records = [conversation(rng, [p]) for p in pairs]
    n_multi = 12 if which == 1 else 4
    records += [conversation(rng, rng.sample(pairs, 2)) for _ in range(n_multi)]
    rng.shuffle(records)
    return records


def completions(rng: random.Random, n: int) -> list[dict]:
    table = facts()
    asks = [("Which river runs past {p}?", "The {r}."), ("What do most people in {p} grow?", "They grow {c}."),
            ("What is the oldest trade in {p}?", "The oldest trade in {p} is {t}."),
            ("Which animals live near {p}?", "There are {a} near {p}.")]
    out = []
    for _ in range(n):
        p = rng.choice(sorted(table))
        question, answer = rng.choice(asks)
        out.append({"prompt": f"Question: {question.format(p=p)}\nAnswer:",
                    "completion": " " + answer.format(p=p, **table[p])})
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def main() -> None:
    rng = random.Random(0)
    write_jsonl(OUT / "facts" / "train.jsonl", facts_split(rng, 1))
    write_jsonl(OUT / "facts" / "valid.jsonl", facts_split(rng, 2))
    write_jsonl(OUT / "completion.jsonl", completions(rng, 200))
    paragraphs = [english_text(8, seed=s) for s in range(60)]
    (OUT / "towns.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    for path in sorted(OUT.rglob("*.*")):
        print(f"{path.relative_to(OUT)}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
