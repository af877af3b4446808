"""
Arithmetic word problems with exact answers, for verifiable-reward runs without downloads (IRPO, ScPO).
Each family is a problem shape with random numbers. The split is by *problem*, not by text: a problem is the
operation and its operands, in any order where the order does not matter (`3 + 4` and `4 + 3` are one problem;
`12 - 5` and `5 - 12` are two), and for stories the numbers and the operation, not the names or the things.
About one problem in three is a test problem, by a hash of the problem, so a test question's commutative twin
or its re-telling with other names is never a training question, in any family.

    python data/make_arith.py --family small --n 102 --split train --out data/arith_train.jsonl
    python data/make_arith.py --family small --n 24 --split test --out data/arith_test.jsonl
    python data/make_arith.py --list                     # the families

The committed files are the `small` family (single-digit sums and products): its 81 problems give 57 training
problems, written as 102 questions (both orders of each sum and product), and 24 test problems (16 sums and
8 products), one question each. Questions are drawn as new problems first, then other wordings of problems
already drawn; a split with fewer distinct questions than --n is an error.

Records: `id`, `prompt` (the question), `answer` (the number as a string), `family`.
"""
import argparse
import hashlib
import json
import os
import random

NAMES = ["Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Leo", "Maya", "Nils"]
THINGS = ["apples", "stickers", "marbles", "books", "pencils", "shells", "cookies", "stamps", "coins", "cards"]

# Each family returns (question, answer, problem); the problem key puts operands whose order does not matter in
# sorted order, so a question and its commutative twin share it.


def add_small(r):
    a, b = r.randint(1, 9), r.randint(1, 9)
    return f"What is {a} + {b}?", a + b, ("+", *sorted((a, b)))


def add_two_digit(r):
    a, b = r.randint(10, 49), r.randint(10, 49)
    return f"What is {a} + {b}?", a + b, ("+", *sorted((a, b)))


def mul_small(r):
    a, b = r.randint(2, 9), r.randint(2, 9)
    return f"What is {a} times {b}?", a * b, ("*", *sorted((a, b)))


def story_add(r):
    name, thing = r.choice(NAMES), r.choice(THINGS)
    a, b = r.randint(2, 9), r.randint(2, 9)
    return f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?", a + b, ("+", *sorted((a, b)))


def story_sub(r):
    name, thing = r.choice(NAMES), r.choice(THINGS)
    a = r.randint(6, 15)
    b = r.randint(1, a - 1)
    return f"{name} had {a} {thing} and gave {b} of them away. How many {thing} does {name} have left?", a - b, ("-", a, b)


def story_two_step(r):
    name, thing = r.choice(NAMES), r.choice(THINGS)
    a, b, c = r.randint(3, 9), r.randint(2, 6), r.randint(1, 3)
    return ((f"{name} buys {a} bags with {b} {thing} in each bag, then loses {c} {thing}. "
             f"How many {thing} does {name} have?"), a * b - c, ("*-", *sorted((a, b)), c))


def small(r):
    """Single-digit sums and products: the family on which the embedded 135M model, asked few-shot, is right
    in about a quarter of its sampled answers (see the README)."""
    return (add_small if r.random() < 0.5 else mul_small)(r)


FAMILIES = {"add-small": add_small, "add-two-digit": add_two_digit, "mul-small": mul_small, "small": small,
            "story-add": story_add, "story-sub": story_sub, "story-two-step": story_two_step}
PATIENCE = 5000  # draws without a new problem before other wordings of drawn ones are taken


def split_of(problem):
    """'test' for about one problem in three, 'train' for the rest: a pure function of the problem key."""
    return "test" if int(hashlib.sha256(json.dumps(problem).encode()).hexdigest(), 16) % 3 == 0 else "train"


def make(family, n, split, seed=0):
    """n distinct questions of a family from its `split`: new problems until PATIENCE draws find none, then also
    other wordings of the problems drawn so far. Deterministic: a smaller n gives a prefix of a larger one."""
    r = random.Random(f"{family}/{seed}")
    out, problems, texts, idle, new_only = [], set(), set(), 0, True
    while len(out) < n:
        q, a, key = FAMILIES[family](r)
        idle += 1
        if split_of(key) != split or q in texts or (new_only and key in problems):
            new_only = new_only and idle < PATIENCE
            if idle > 20 * PATIENCE:  # no new question in this many draws: the split has no more
                raise SystemExit(f"--n {n}: the {split} split of {family} has only {len(out)} distinct questions; "
                                 f"ask for at most {len(out)}")
            continue
        problems.add(key)
        texts.add(q)
        idle = 0
        out.append({"id": f"{family}-{split}-{len(out):05d}", "prompt": q, "answer": str(a), "family": family})
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Arithmetic word problems with exact answers.")
    p.add_argument("--family", default="story-add", choices=sorted(FAMILIES), help="problem shape")
    p.add_argument("--n", type=int, default=200, help="distinct questions to write (at least 1)")
    p.add_argument("--split", default="train", choices=("train", "test"), help="which split (disjoint problems)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws")
    p.add_argument("--out", default=None, help="JSONL to write (default: print)")
    p.add_argument("--list", action="store_true", help="list the families with an example each")
    a = p.parse_args(argv)
    if a.n < 1:
        raise SystemExit(f"--n: {a.n} is invalid (must be at least 1)")
    if a.out and (os.path.isdir(a.out) or not os.path.isdir(os.path.dirname(os.path.abspath(a.out)))):
        raise SystemExit(f"--out {a.out}: not a file in an existing folder")
    return a


def main(argv=None):
    a = parse_args(argv)
    if a.list:
        for name, fn in sorted(FAMILIES.items()):
            q, ans, _ = fn(random.Random(0))
            print(f"{name:16s} {q}  -> {ans}")
        return
    text = "".join(json.dumps(rec) + "\n" for rec in make(a.family, a.n, a.split, a.seed))
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
        print(f"{a.n} {a.family} questions ({a.split}) -> {a.out}")
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
