"""
A second in-context task with another surface than `ops` (words, no LaTeX operators): made-up units, "How many pips
are in 7 zorps?", whose factor only a worked example of the same unit reveals. Writes two JSONL files any script reads
(`--data DIR/train.jsonl --eval-data DIR/test.jsonl`):
    python tests/units_task.py runs/units    # -> runs/units/train.jsonl (600 draws), runs/units/test.jsonl (48)
The test split holds 3 of the counts 2-9 out per unit: no (unit, count) of it occurs in training.
"""
import json, os, random, sys

UNITS = ["zorp", "blick", "quib", "flom", "trel", "snib", "gax", "wump", "drel", "plon", "vosk", "teb", "miv", "kroo",
         "yint", "fesk"]
COUNTS = range(2, 10)


def units_problems(seed=0, n_train=600):
    """(train, test): each unit's factor from 2-9 pips by a fixed draw, 3 held-out counts per unit."""
    rng = random.Random(1234)  # the task itself is fixed; the seed only draws the training sample
    factors = {u: rng.randint(2, 9) for u in UNITS}
    held = {u: set(rng.sample(list(COUNTS), 3)) for u in UNITS}

    def row(u, n):
        y = n * factors[u]
        return {"problem": f"How many pips are in {n} {u}s?", "answer": str(y), "subject": f"Unit {u}",
                "solution": f"One {u} is {factors[u]} pips, so {n} {u}s are {n} times {factors[u]} = {y} pips. "
                            f"The answer is $\\boxed{{{y}}}$.", "unique_id": f"units/{u}/{n}"}

    test = [row(u, n) for u in UNITS for n in sorted(held[u])]
    pool = [(u, n) for u in UNITS for n in COUNTS if n not in held[u]]
    draw = random.Random(seed)
    return [row(*draw.choice(pool)) for _ in range(n_train)], test


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "runs/units"
    os.makedirs(out, exist_ok=True)
    for name, rows in zip(("train", "test"), units_problems()):
        with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{out}/{name}.jsonl: {len(rows)} problems")
