"""Procedurally generated tasks for the tiny pretrained model.

Every example is drawn from a small *problem* (a pair of numbers, a list of digits, a
string, a dictionary, a boolean expression) and rendered in one task's format.  Two kinds
of tasks use the same generators:

* ``PRETRAIN_SKILLS``: the formats the pretraining corpus mixes (``12+345=357``,
  ``sort 3 9 1=1 3 9``, ``rev abc=cba``, ``a:3 b:7 get b=7``, ``bool t&!f=t``, ...).
* ``TASKS``: the downstream evaluation tasks.  Some keep a pretraining format (``add``),
  most rephrase or compose skills the model has (``add_words``, ``max``, ``sort_desc``,
  ``lookup``, ``spell_back``, and the multiple-choice ``bigger`` and ``logic_words``), so
  the pretrained model does poorly on them zero-shot and fine-tuning has something to win.

Held-out splits.  A problem's *key* names its data, not its format (``add`` and
``add_words`` share ``pair:12,345``).  ``split_of(key)`` puts a fixed 20% of all
problems (by a SHA-1 hash of the key) in ``"test"``; the pretraining corpus and every
``"train"`` split only ever draw the other 80%, so no test problem is seen in any format
before evaluation.  The test split is also drawn from a different seed, without
duplicates.  Generation uses ``random.Random`` seeded with a string, so it is the same on
every machine and Python run.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

__all__ = ["Example", "Task", "TASKS", "PRETRAIN_SKILLS", "PRETRAIN_WEIGHTS", "TEST_FRACTION",
           "DEFAULT_TASKS", "split_of", "get_task", "task_names"]

TEST_FRACTION = 0.2
SPLITS = ("train", "test")
DEFAULT_SEEDS = {"train": 0, "test": 1}


@dataclass(frozen=True)
class Example:
    """``prompt`` + ``answer`` is the text; ``choices`` is set for multiple-choice tasks."""
    prompt: str
    answer: str
    choices: Tuple[str, ...] = ()
    key: str = ""

    @property
    def text(self) -> str:
        return self.prompt + self.answer


def split_of(key: str) -> str:
    """``"test"`` for a fixed ``TEST_FRACTION`` of problem keys, ``"train"`` for the rest."""
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")
    return "test" if (h % 1000) < TEST_FRACTION * 1000 else "train"


# -- problems ------------------------------------------------------------------------------

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _num(rng: random.Random, max_digits: int = 3) -> int:
    d = rng.randint(1, max_digits)
    return rng.randint(0 if d == 1 else 10 ** (d - 1), 10 ** d - 1)


def _pair(rng):
    a, b = _num(rng), _num(rng)
    return f"pair:{a},{b}", (a, b)


def _digits(rng, lo=3, hi=7):
    ds = [rng.randint(0, 9) for _ in range(rng.randint(lo, hi))]
    return "list:" + "".join(map(str, ds)), ds


def _string(rng, lo=3, hi=7):
    s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))
    return f"str:{s}", s


def _dict(rng, lo=2, hi=5):
    keys = rng.sample(LETTERS, rng.randint(lo, hi))
    items = [(k, rng.randint(0, 99)) for k in keys]
    q = rng.choice(keys)
    return "dict:" + ",".join(f"{k}{v}" for k, v in items) + f";{q}", (items, q)


def _logic(rng, lo=2, hi=5):
    n = rng.randint(lo, hi)
    lits = [("!" if rng.random() < 0.3 else "") + rng.choice("tf") for _ in range(n)]
    ops = [rng.choice("&|") for _ in range(n - 1)]
    expr = lits[0] + "".join(o + l for o, l in zip(ops, lits[1:]))
    return f"logic:{expr}", expr


def _eval_logic(expr: str) -> bool:
    words = {"!": " not ", "&": " and ", "|": " or ", "t": " True ", "f": " False "}
    return bool(eval("".join(words[c] for c in expr), {"__builtins__": {}}, {}))  # only t f ! & |


def _logic_words(expr: str) -> str:
    words = {"!": "not ", "&": " and ", "|": " or ", "t": "t", "f": "f"}
    return "".join(words[c] for c in expr)


# -- formats -------------------------------------------------------------------------------
# Each maker draws one problem and returns (key, Example).

def _add(rng):
    key, (a, b) = _pair(rng)
    return key, Example(f"{a}+{b}=", str(a + b), key=key)


def _add_words(rng):
    key, (a, b) = _pair(rng)
    return key, Example(f"what is {a} plus {b}? ", str(a + b), key=key)


def _sub(rng):
    _, (a, b) = _pair(rng)
    a, b = max(a, b), min(a, b)
    key = f"pair:{a},{b}"  # of the ordered pair: one key per text
    return key, Example(f"{a}-{b}=", str(a - b), key=key)


def _mul(rng):
    a, b = _num(rng), rng.randint(0, 9)
    key = f"mul:{a},{b}"
    return key, Example(f"{a}*{b}=", str(a * b), key=key)


def _cmp(rng):
    key, (a, b) = _pair(rng)
    if rng.random() < 0.1:
        b = a
        key = f"pair:{a},{b}"
    ans = "<" if a < b else (">" if a > b else "=")
    return key, Example(f"cmp {a},{b}=", ans, key=key)


def _bigger(rng):
    key, (a, b) = _pair(rng)
    return key, Example(f"is {a} more than {b}? ", "yes" if a > b else "no", ("yes", "no"), key=key)


def _sort(rng):
    key, ds = _digits(rng)
    return key, Example("sort " + " ".join(map(str, ds)) + "=", " ".join(map(str, sorted(ds))), key=key)


def _sort_desc(rng):
    key, ds = _digits(rng)
    return key, Example("sort down " + " ".join(map(str, ds)) + "=",
                        " ".join(map(str, sorted(ds, reverse=True))), key=key)


def _max(rng):
    key, ds = _digits(rng)
    return key, Example("max " + " ".join(map(str, ds)) + "=", str(max(ds)), key=key)


def _copy(rng):
    key, s = _string(rng)
    return key, Example(f"copy {s}=", s, key=key)


def _rev(rng):
    key, s = _string(rng)
    return key, Example(f"rev {s}=", s[::-1], key=key)


def _len(rng):
    key, s = _string(rng)
    return key, Example(f"len {s}=", str(len(s)), key=key)


def _spell_back(rng):
    key, s = _string(rng)
    return key, Example(f"spell backwards {s}:", s[::-1], key=key)


def _get(rng):
    key, (items, q) = _dict(rng)
    return key, Example(" ".join(f"{k}:{v}" for k, v in items) + f" get {q}=", str(dict(items)[q]), key=key)


def _lookup(rng):
    key, (items, q) = _dict(rng)
    return key, Example("{" + ",".join(f"{k}:{v}" for k, v in items) + "}" + f"[{q}]=",
                        str(dict(items)[q]), key=key)


def _bool(rng):
    key, expr = _logic(rng)
    return key, Example(f"bool {expr}=", "t" if _eval_logic(expr) else "f", key=key)


def _logic_words_task(rng):
    key, expr = _logic(rng)
    return key, Example(f"{_logic_words(expr)} is ", "true" if _eval_logic(expr) else "false",
                        ("true", "false"), key=key)


# -- tasks ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    """A generator of examples with held-out splits and a metric.

    ``kind`` is ``"exact"`` (greedy decoding, exact match of the answer) or ``"choice"``
    (the choice with the highest log-likelihood given the prompt must be the answer).
    """
    name: str
    kind: str
    description: str
    make: Callable[[random.Random], Tuple[str, Example]] = field(repr=False)
    max_new_tokens: int = 8
    split_fn: Callable[[str], str] = field(default=None, repr=False)  # key -> split; default split_of

    def examples(self, split: str, n: int, seed: Optional[int] = None) -> List[Example]:
        """``n`` examples of ``split`` (``"train"`` or ``"test"``), the same for the same seed.

        The default seed is 0 for train and 1 for test; test examples are distinct.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        seed = DEFAULT_SEEDS[split] if seed is None else seed
        rng = random.Random(f"{self.name}/{split}/{seed}")
        out, seen = [], set()
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > 200 * n + 1000:
                raise ValueError(f"task {self.name}: could not draw {n} distinct {split} problems")
            key, ex = self.make(rng)
            if (self.split_fn or split_of)(key) != split:
                continue
            if split == "test":
                if ex.text in seen:
                    continue
                seen.add(ex.text)
            out.append(ex)
        return out


PRETRAIN_SKILLS: Dict[str, Task] = {t.name: t for t in [
    Task("add", "exact", "a+b= (0..999)", _add, 5),
    Task("sub", "exact", "a-b= with a >= b", _sub, 5),
    Task("mul", "exact", "a*b= (0..999 x 0..9)", _mul, 5),
    Task("cmp", "exact", "cmp a,b= -> < > =", _cmp, 2),
    Task("sort", "exact", "sort 3 9 1= -> 1 3 9", _sort, 14),
    Task("copy", "exact", "copy abc= -> abc", _copy, 8),
    Task("rev", "exact", "rev abc= -> cba", _rev, 8),
    Task("len", "exact", "len abc= -> 3", _len, 3),
    Task("get", "exact", "a:3 b:7 get b= -> 7", _get, 4),
    Task("bool", "exact", "bool t&!f|f= -> t", _bool, 2),
]}
# relative frequency of each skill in the pretraining corpus
PRETRAIN_WEIGHTS: Dict[str, float] = {"add": 2, "sub": 1, "mul": 0.5, "cmp": 1, "sort": 1.5, "copy": 2,
                                      "rev": 2, "len": 0.5, "get": 2, "bool": 1.5}

TASKS: Dict[str, Task] = {t.name: t for t in [
    Task("add", "exact", "a+b= in the pretraining format, held-out pairs", _add, 5),
    Task("add_words", "exact", "'what is a plus b? ' (new phrasing of add)", _add_words, 5),
    Task("max", "exact", "max 3 9 1= -> 9 (new: composes compare/sort)", _max, 2),
    Task("sort_desc", "exact", "sort down 3 9 1= -> 9 3 1 (new: sort + reverse)", _sort_desc, 14),
    Task("lookup", "exact", "{a:3,b:7}[b]= -> 7 (new syntax for get)", _lookup, 4),
    Task("spell_back", "exact", "spell backwards abc: -> cba (new phrasing of rev)", _spell_back, 8),
    Task("bigger", "choice", "is a more than b? yes/no (new phrasing of cmp)", _bigger, 2),
    Task("logic_words", "choice", "t and not f or f is true/false (new phrasing of bool)", _logic_words_task, 2),
]}
DEFAULT_TASKS = list(TASKS)


def task_names() -> List[str]:
    return list(TASKS)


def get_task(name: str) -> Task:
    if name in TASKS:
        return TASKS[name]
    raise KeyError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
