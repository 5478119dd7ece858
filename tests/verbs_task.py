"""
A second in-context task with another surface than `ops` (words, no LaTeX operators): made-up verbs, "Compute 7
zorped.", each adding a number that only a worked example of the same verb reveals. Writes two JSONL files any script
reads (`--data DIR/train.jsonl --eval-data DIR/test.jsonl`):
    python tests/verbs_task.py runs/verbs    # -> runs/verbs/train.jsonl (600 draws), runs/verbs/test.jsonl (48)
The test split holds 3 of the numbers 1-9 out per verb: no (verb, number) of it occurs in training.
"""
import json, os, random, sys

VERBS = ["zorp", "blick", "quib", "flom", "trel", "snib", "gax", "wump", "drel", "plon", "vosk", "teb", "miv", "kroo",
         "yint", "fesk"]
NUMBERS = range(1, 10)


def verbs_problems(seed=0, n_train=600):
    """(train, test): each verb adds 2-9 (a fixed draw); 3 held-out numbers per verb; seed draws the training sample."""
    rng = random.Random(1234)
    adds = {v: rng.randint(2, 9) for v in VERBS}
    held = {v: set(rng.sample(list(NUMBERS), 3)) for v in VERBS}

    def row(v, n):
        y = n + adds[v]
        return {"problem": f"Compute {n} {v}ed.", "answer": str(y), "subject": f"Verb {v}", "unique_id": f"verbs/{v}/{n}",
                "solution": f"To {v} a number, add {adds[v]}: {n} + {adds[v]} = {y}, so the answer is $\\boxed{{{y}}}$."}

    test = [row(v, n) for v in VERBS for n in sorted(held[v])]
    pool = [(v, n) for v in VERBS for n in NUMBERS if n not in held[v]]
    draw = random.Random(seed)
    return [row(*draw.choice(pool)) for _ in range(n_train)], test


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "runs/verbs"
    os.makedirs(out, exist_ok=True)
    for name, rows in zip(("train", "test"), verbs_problems()):
        with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{out}/{name}.jsonl: {len(rows)} problems")
