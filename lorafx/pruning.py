"""``lorafx.prune``: prune a model's linear weights (magnitude or Wanda; unstructured or N:M).

    pruned = lorafx.prune(model, sparsity=0.5, method="wanda", calibration=batches)
    pruned = lorafx.prune(model, sparsity=0.5, pattern="2:4", method="magnitude", inplace=True)

The model is captured and the masks are computed through its graph by the
``PruneWeights`` pass (the same code ``lorafx.compile(..., sparsity=...)`` runs).  By
default the model is not touched: a deep copy is pruned and returned.  With
``inplace=True`` the model's own weights are written (every mask is computed first, so
a failure leaves the model as it was).  To fine-tune a pruned model with LoRA that stays
sparse, compile it with ``sparsity="keep"`` (or prune inside compile with ``sparsity=0.5``).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Iterable, Optional, Sequence, Union

import torch

from lorafx.passes import InlineGradModeRegions, PruneWeights
from lorafx.passes.insert_lora import ALL_LINEAR
from lorafx.passes.prune_weights import KEEP

from .capture import capture
from .compiled import own_base
from .compiler import _check_model, compile_context
from .graph_utils import get_attr
from .meta import graph_record
from .pipeline import Pipeline

__all__ = ["prune", "pruned_weights"]


def pruned_weights(model: torch.nn.Module, sparsity: float = 0.5, *, method: str = "wanda",
                   pattern: str = "unstructured", modules: Union[str, Sequence[str]] = ALL_LINEAR,
                   calibration: Optional[Iterable[Any]] = None, example_inputs: Optional[Sequence[Any]] = None,
                   example_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, torch.Tensor]:
    """{parameter name: pruned weight} (new tensors) for ``model``; the model is not changed."""
    _check_model(model)
    if sparsity == KEEP or sparsity is None:
        raise ValueError(f"lorafx.prune needs a sparsity in [0, 1), got {sparsity!r}; "
                         "('keep' is for lorafx.compile, to fine-tune a model pruned already)")
    prune_pass = PruneWeights(sparsity=sparsity, method=method, pattern=pattern, modules=modules)
    example_inputs, example_kwargs, ctx = compile_context(model, example_inputs, example_kwargs,
                                                          calibration=calibration)
    gm = capture(model, example_inputs, example_kwargs)
    own_base(gm, model)
    gm = Pipeline([InlineGradModeRegions(), prune_pass])(gm, ctx).graph_module
    return {path: get_attr(gm, path).detach() for path in graph_record(gm).sparsity}


def prune(model: torch.nn.Module, sparsity: float = 0.5, *, method: str = "wanda", pattern: str = "unstructured",
          modules: Union[str, Sequence[str]] = ALL_LINEAR, calibration: Optional[Iterable[Any]] = None,
          example_inputs: Optional[Sequence[Any]] = None, example_kwargs: Optional[Dict[str, Any]] = None,
          inplace: bool = False) -> torch.nn.Module:
    """Prune ``model``'s linear weights (every linear but the output layer by default) to
    ``sparsity`` zeros by ``method`` ("wanda": needs ``calibration`` batches; "magnitude")
    in ``pattern`` ("unstructured", "2:4", "4:8").  Returns a pruned deep copy, or, with
    ``inplace=True``, ``model`` itself with its weights written."""
    if not isinstance(inplace, bool):
        raise TypeError(f"lorafx.prune: inplace must be True or False, got {inplace!r}")
    weights = pruned_weights(model, sparsity, method=method, pattern=pattern, modules=modules,
                             calibration=calibration, example_inputs=example_inputs, example_kwargs=example_kwargs)
    target = model if inplace else copy.deepcopy(model)
    params = dict(target.named_parameters(remove_duplicate=False))
    missing = sorted(p for p in weights if p not in params)
    if missing:
        raise RuntimeError(f"lorafx.prune: the captured graph names weights the model does not have: {missing[:3]}")
    with torch.no_grad():
        for path, weight in weights.items():
            params[path].copy_(weight)
    return target
