"""A seeded generator of small GSM8K-style word problems, so everything runs offline.

Each problem takes two or three steps of small-integer arithmetic in a fixed template; the answer is a
worked solution ending ``#### N``, as GSM8K's. A question belongs to the train or the test split by a
hash of its text, so the splits are disjoint whatever the seeds and sizes.
"""
import hashlib
import random

from .errors import InvalidInput

SPLITS = ("train", "test")
TEST_FRACTION = 0.2  # of the question space; the hash decides, so no question is in both splits

NAMES = [("Tom", "he"), ("Anna", "she"), ("Ben", "he"), ("Maria", "she"), ("Sam", "he"), ("Lily", "she"),
         ("Jack", "he"), ("Emma", "she"), ("Leo", "he"), ("Nora", "she"), ("Omar", "he"), ("Zoe", "she")]
ITEMS = ["apples", "pencils", "marbles", "stickers", "cookies", "books", "cards", "shells", "coins", "toys"]
THINGS = [("notebook", "notebooks"), ("sandwich", "sandwiches"), ("ticket", "tickets"), ("pen", "pens"),
          ("cake", "cakes"), ("ball", "balls"), ("kite", "kites"), ("plant", "plants")]


def _add_sub(rng):
    (name, he), item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    c = rng.randint(1, a + b - 1)
    q = (f"{name} has {a} {item}. {he.capitalize()} gets {b} more {item} and then gives {c} {item} to a friend. "
         f"How many {item} does {name} have now?")
    s = (f"After getting more, {name} has {a} + {b} = {a + b} {item}.\n"
         f"After giving some away, {he} has {a + b} - {c} = {a + b - c} {item}.")
    return q, s, a + b - c


def _mul_add(rng):
    (name, he), item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 20)
    q = (f"{name} buys {a} boxes of {item}. Each box has {b} {item}. {he.capitalize()} already had {c} {item}. "
         f"How many {item} does {name} have in total?")
    s = (f"The boxes hold {a} * {b} = {a * b} {item}.\n"
         f"In total {name} has {a * b} + {c} = {a * b + c} {item}.")
    return q, s, a * b + c


def _change(rng):
    (name, he), (thing, things) = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 9), rng.randint(2, 6)
    c = rng.randrange(10 * ((a * b) // 10 + 1), 10 * ((a * b) // 10 + 1) + 31, 10)
    q = f"A {thing} costs {a} dollars. {name} buys {b} of them and pays with {c} dollars. How much change does {he} get?"
    s = (f"The {things} cost {b} * {a} = {a * b} dollars.\n"
         f"The change is {c} - {a * b} = {c - a * b} dollars.")
    return q, s, c - a * b


def _three_days(rng):
    name, he = rng.choice(NAMES)
    a, b = rng.randint(2, 15), rng.randint(2, 15)
    q = (f"{name} reads {a} pages on Monday and {b} pages on Tuesday. On Wednesday {he} reads twice as many pages "
         f"as on Monday. How many pages does {name} read in the three days?")
    s = (f"On Wednesday {he} reads 2 * {a} = {2 * a} pages.\n"
         f"In total {he} reads {a} + {b} + {2 * a} = {a + b + 2 * a} pages.")
    return q, s, a + b + 2 * a


def _share(rng):
    (name, _), item = rng.choice(NAMES), rng.choice(ITEMS)
    friends, each, extra = rng.randint(2, 6), rng.randint(2, 8), rng.randint(1, 10)
    a = friends * each
    q = (f"{name} has {a} {item} and shares them equally among {friends} friends. Each friend then finds "
         f"{extra} more {item}. How many {item} does each friend have?")
    s = (f"Each friend gets {a} / {friends} = {each} {item}.\n"
         f"After finding more, each friend has {each} + {extra} = {each + extra} {item}.")
    return q, s, each + extra


TEMPLATES = (_add_sub, _mul_add, _change, _three_days, _share)


def split_of(question: str) -> str:
    """The split a question belongs to, by a hash of its text (stable across runs and machines)."""
    h = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big")
    return "test" if h / 2**64 < TEST_FRACTION else "train"


def problem(rng: random.Random) -> dict:
    """One problem: {"question", "answer"} with the answer a worked solution ending ``#### N``."""
    q, solution, n = rng.choice(TEMPLATES)(rng)
    return {"question": q, "answer": f"{solution}\n#### {n}"}


def make_split(split: str = "train", n: int = 1000, seed: int = 0) -> list[dict]:
    """``n`` distinct problems of ``split``, the same for the same (split, n, seed).

    Args:
        split: "train" or "test"; the two never share a question.
        n: how many problems.
        seed: the generator seed.

    Raises:
        ValueError: unknown split or n < 1.
    """
    if split not in SPLITS:
        raise InvalidInput(f"split={split!r} is not valid for arithmetic; choose one of {', '.join(SPLITS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidInput(f"n={n!r} is not valid; ask for at least one problem")
    rng = random.Random(f"arithmetic-{split}-{seed}")
    out, seen = [], set()
    for _ in range(200 * n):
        p = problem(rng)
        if p["question"] in seen or split_of(p["question"]) != split:
            continue
        seen.add(p["question"])
        out.append(p)
        if len(out) == n:
            return out
    raise InvalidInput(f"could not draw {n} distinct arithmetic problems; ask for fewer")


def answer_number(answer: str) -> int:
    """The final number of a worked answer: the integer after ``####``."""
    return int(answer.rsplit("####", 1)[1].strip().replace(",", ""))
