"""Make the SFT dataset of the main job: turn a sentence about a person into one line of JSON.

    python scripts/data/make_people_json.py      # rewrites people_json_{train,eval}.jsonl here

Each example is a ``messages`` conversation: the user asks for the person's details as JSON
and gives a sentence (one of several phrasings); the assistant answers with exactly
``{"name": ..., "age": ..., "city": ..., "job": ...}`` and nothing else. SmolLM2-135M-Instruct
does not answer in that form by itself; the fixed format and copying are what a small LoRA
learns in a few dozen steps. Deterministic: the same files on every run. The held-out file
uses the same phrasings with other draws.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
N_TRAIN, N_EVAL = 400, 40

NAMES = ["Alice", "Bruno", "Chen", "Dana", "Emeka", "Farah", "Gustav", "Hana", "Ivan", "Julia", "Kofi", "Lena",
         "Mateo", "Nadia", "Oscar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wei", "Yusuf",
         "Zoe", "Amara", "Diego", "Elif", "Hugo", "Ines", "Jonas", "Keiko", "Luca", "Maya", "Nils", "Olga"]
CITIES = ["Paris", "Lagos", "Osaka", "Lima", "Oslo", "Cairo", "Denver", "Madrid", "Seoul", "Dublin", "Nairobi",
          "Lisbon", "Toronto", "Hanoi", "Vienna", "Quito", "Perth", "Accra", "Munich", "Porto", "Austin", "Tunis"]
JOBS = ["nurse", "engineer", "teacher", "chef", "pilot", "lawyer", "farmer", "painter", "dentist", "baker",
        "architect", "plumber", "librarian", "journalist", "pharmacist", "carpenter", "musician", "biologist"]
PHRASINGS = [
    "{name} is {a_age}-year-old {job} who lives in {city}.",
    "{name}, {age}, works as {a_job} in {city}.",
    "Meet {name}: {a_job} from {city}, aged {age}.",
    "In {city} there lives {a_job} called {name}, who is {age} years old.",
    "At {age}, {name} has a job as {a_job} and a home in {city}.",
    "{name} moved to {city} to work as {a_job}; {name} is now {age}.",
]
INSTRUCTIONS = [
    "Extract the person's details as JSON: {sentence}",
    "Give name, age, city and job as JSON. {sentence}",
]


def example(rng: random.Random) -> dict:
    person = dict(name=rng.choice(NAMES), age=rng.randint(19, 88), city=rng.choice(CITIES), job=rng.choice(JOBS))
    a_job = ("an " if person["job"][0] in "aeiou" else "a ") + person["job"]
    a_age = ("an " if str(person["age"]).startswith("8") else "a ") + str(person["age"])
    sentence = rng.choice(PHRASINGS).format(a_job=a_job, a_age=a_age, **person)
    prompt = rng.choice(INSTRUCTIONS).format(sentence=sentence)
    return {"messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": json.dumps(person)}]}


def write(path: Path, examples: list[dict]) -> None:
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))


if __name__ == "__main__":
    rng = random.Random(2026)
    examples, seen = [], set()
    while len(examples) < N_TRAIN + N_EVAL:
        e = example(rng)
        key = e["messages"][0]["content"]
        if key not in seen:  # no prompt in both files
            seen.add(key)
            examples.append(e)
    write(HERE / "people_json_train.jsonl", examples[:N_TRAIN])
    write(HERE / "people_json_eval.jsonl", examples[N_TRAIN:])
