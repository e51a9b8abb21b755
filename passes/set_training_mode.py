"""SetTrainingMode: switch a captured graph between train and eval behaviour.

torch.export bakes the dropout mode into the graph (and the exported module's
``train()`` raises), so lorafx captures in training mode and flips the flags.

Requires: a captured graph.  Provides: ``"training_mode"``.
Preserves: every computation except dropout, which becomes the identity in eval.

Before (train)::

    %dropout = call_function[target=aten.dropout.default](args=(%x, 0.1, True))
    %sdpa = call_function[target=aten.scaled_dot_product_attention.default](args=(%q, %k, %v, %mask, 0.1))

After ``SetTrainingMode(train=False)``::

    %dropout = call_function[target=aten.dropout.default](args=(%x, 0.1, False))
    %sdpa = call_function[target=aten.scaled_dot_product_attention.default](args=(%q, %k, %v, %mask, 0.0))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx

from lorafx.context import CompileContext
from lorafx.dialect import owner_of
from lorafx.meta import DropoutRecord, get_record, graph_record, set_record
from lorafx.pipeline import CAPTURED, Pass, PassResult

__all__ = ["SetTrainingMode", "set_training_mode"]

aten = torch.ops.aten
_FLAG_OPS = {  # ops called as (input, p, train)
    aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
    aten.feature_alpha_dropout.default,
}
_BATCH_NORM_TRAIN = {aten.batch_norm.default: 5, aten._native_batch_norm_legit_functional.default: 5}


@dataclass(frozen=True)
class SetTrainingMode(Pass):
    train: Optional[bool] = True  # None: the compile's mode (ctx.training)

    requires = frozenset({CAPTURED})
    provides = frozenset({"training_mode"})

    @classmethod
    def from_options(cls, values, ctx: CompileContext) -> "SetTrainingMode":
        """In compile's pipeline: the mode of the model being compiled."""
        return cls(train=None)

    def validate(self) -> None:
        if self.train is not None and not isinstance(self.train, bool):
            raise ValueError(f"SetTrainingMode: train must be a bool or None (the compile's mode), got {self.train!r}")

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        train = ctx.training if self.train is None else self.train
        flipped = set_training_mode(gm, train)
        return PassResult(gm, flipped > 0, {"train": train, "flipped": flipped})


def _set_arg(node: torch.fx.Node, index: int, name: str, value) -> bool:
    if len(node.args) > index:
        if node.args[index] == value:
            return False
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
        return True
    if node.kwargs.get(name, None if name == "train" else 0.0) == value:
        return False
    node.kwargs = {**node.kwargs, name: value}
    return True


def set_training_mode(gm: torch.fx.GraphModule, train: bool) -> int:
    """Flip dropout flags and SDPA's dropout_p in place; returns how many nodes changed."""
    changed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        kind = owner_of(node)
        if kind is not None:  # LoRA ops and their helpers (adapter dropout masks): their kind switches them
            changed += kind.set_training(node, train)
        elif node.target in _FLAG_OPS:
            changed += _set_arg(node, 2, "train", train)
        elif node.target is aten.scaled_dot_product_attention.default:
            rec = get_record(node, DropoutRecord)
            if rec is None:
                p = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
                if not p:
                    continue
                rec = DropoutRecord(p=float(p))
                set_record(node, rec)
            changed += _set_arg(node, 4, "dropout_p", rec.p if train else 0.0)
        elif node.target in _BATCH_NORM_TRAIN:
            index = _BATCH_NORM_TRAIN[node.target]
            captured_train = node.args[index] if len(node.args) > index else node.kwargs.get("training")
            if bool(captured_train) != train:
                raise NotImplementedError(
                    f"node {node.name}: batch norm captured in {'train' if captured_train else 'eval'} mode cannot "
                    f"be switched to {'train' if train else 'eval'} mode (train mode uses batch statistics and "
                    "updates the running ones); capture the model in the mode you run it "
                    f"(lorafx.capture(..., training={train})); lorafx.compile does this for you, once per mode")
    graph_record(gm).training = train
    if changed:
        gm.recompile()
    return changed
