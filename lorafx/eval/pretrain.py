"""Pretraining of the tiny evaluation model (``tools/pretrain_tiny.py`` runs it).

The corpus is generated on the fly from ``PRETRAIN_SKILLS`` (train problems only) with
the mixture ``PRETRAIN_WEIGHTS``: examples ``<bos> prompt answer <eos>`` are packed whole
into windows of ``seq_len`` tokens (right-padded), and the loss is on answer tokens only.
Everything is drawn from seeded ``random.Random`` / torch generators, so with one thread
and deterministic algorithms the same arguments give the same checkpoint.
"""
from __future__ import annotations

import random
from typing import Dict, Iterator, List, Tuple

import torch

from .tasks import PRETRAIN_SKILLS, PRETRAIN_WEIGHTS, Example, split_of
from .tokenizer import BOS, EOS, PAD

__all__ = ["MODEL_CONFIG", "TRAIN_CONFIG", "model_config", "char_encoder", "corpus_examples", "corpus_batches"]

# LLaMA architecture, ~1.8M parameters (7 MB in float32)
MODEL_CONFIG = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                    num_key_value_heads=6, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
# the recipe of the shipped checkpoint (tools/pretrain_tiny.py defaults)
TRAIN_CONFIG = dict(steps=6000, batch_size=32, seq_len=64, lr=3e-3, min_lr=1e-4, warmup=200, weight_decay=0.01,
                    seed=0, clip=1.0)


def model_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig
    cfg = dict(MODEL_CONFIG, vocab_size=vocab_size, **overrides)
    return LlamaConfig(**cfg)


def char_encoder(tokenizer):
    """A fast ``text -> ids`` for the character tokenizer (the same ids as the tokenizer gives)."""
    vocab = tokenizer.get_vocab()
    unk = tokenizer.unk_token_id
    table: Dict[str, int] = {c: i for c, i in vocab.items() if len(c) == 1}
    return lambda text: [table.get(c, unk) for c in text.lower()]


def corpus_examples(seed: int) -> Iterator[Tuple[str, Example]]:
    """The endless corpus stream: ``(skill, example)`` drawn with ``PRETRAIN_WEIGHTS``, train problems only."""
    rng = random.Random(f"pretrain/{seed}")
    names = list(PRETRAIN_SKILLS)
    weights = [PRETRAIN_WEIGHTS[n] for n in names]
    while True:
        name = rng.choices(names, weights)[0]
        key, ex = PRETRAIN_SKILLS[name].make(rng)
        if split_of(key) == "train":
            yield name, ex


def corpus_batches(tokenizer, *, batch_size: int, seq_len: int, seed: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """An endless stream of ``(input_ids, labels)`` (batch_size, seq_len) pretraining batches."""
    enc = char_encoder(tokenizer)
    stream = corpus_examples(seed)
    pending: Tuple[List[int], List[int]] = ([], [])

    def example():
        ex = next(stream)[1]
        p, a = [BOS] + enc(ex.prompt), enc(ex.answer) + [EOS]
        return p + a, [-100] * len(p) + a

    while True:
        ids = torch.full((batch_size, seq_len), PAD, dtype=torch.long)
        lab = torch.full((batch_size, seq_len), -100, dtype=torch.long)
        for row in range(batch_size):
            n = 0
            while True:
                if not pending[0]:
                    pending = example()
                s, l = pending
                if n + len(s) > seq_len:
                    if n == 0:  # longer than a window: drop it
                        pending = ([], [])
                        continue
                    break
                ids[row, n:n + len(s)] = torch.tensor(s)
                lab[row, n:n + len(s)] = torch.tensor(l)
                n += len(s)
                pending = ([], [])
        yield ids, lab
