"""The LoRA dialect: the kinds of LoRA op and the registry every pass asks.

One module per kind, each registering itself on import:

* ``linear``     ``lora_linear`` and its keep-XA variant ``lora_linear_xa`` (plus the
  ``dropout_mask`` and ``lora_linear_backward`` helper ops and the kernels the other
  kinds reuse);
* ``recompute``  ``lora_linear_recompute``, which rebuilds its input in backward from a
  ``recipe`` (the recipe language is in ``recipe``);
* ``siblings``   ``lora_linear_siblings``, the adapters that read one input, as one op;
* ``folded``     ``lora_linear_folded``, with A stored under W in one buffer;
* ``sparse``     ``lora_linear_sparse``, a LoRA linear on a pruned weight that keeps its
  zero pattern (LoRS), with its ``SparseRecord``;
* ``cim``        ``rram_linear`` (a frozen linear on noisy RRAM crossbars, optionally reading a
  programmed chip) and ``lora_sram`` (its adapter in exact SRAM): the compute-in-memory lowering;
* ``dora``       ``lora_dora``, weight-decomposed LoRA (DoRA): the adapted linear's rows rescaled to a
  trained magnitude, with the row norms of W + s·B A computed without forming it;
* ``embedding``  ``lora_embedding``, an adapted ``nn.Embedding`` (a lookup into A, then B);
* ``parameter``  ``lora_parameter``, an adapted bare parameter (PEFT's ``target_parameters``): W + s·B A;
* ``conv``       ``lora_conv``, PEFT's LoRA on a convolution (Conv1d/2d/3d, grouped or not);
* ``dora_layers`` ``lora_dora_conv`` and ``lora_dora_embedding``, DoRA on convolutions and embeddings;
* ``shortcut``   ``lora_shortcut``, a LoRA-adapted shortcut connection (HeteroLoRA):
  y + s·(h Aᵀ) Bᵀ between two points of the residual stream, with its ``ShortcutRecord``.

``registry`` holds the ``OpKind`` protocol, ``register_kind`` / ``kind_of`` / ``kinds``,
and the named argument views (``args_of``, ``set_args``, ``write``, ``create``).  A new
kind is a module like these: its ``torch.library`` ops, an ``OpKind`` subclass, and a
``register_kind`` call.
"""
from .registry import (ArgView, InputQuery, MergedFrom, NodeCost, OpKind, ScheduleFamily, args_of, canonicalize,
                       create, kind_named, kind_of, kinds, lint, lora_nodes, owner_of, register_kind, replace_node,
                       set_args, write)
from .linear import LINEAR, lora_linear_reference, schedule_counts
from .recompute import RECOMPUTE
from .siblings import SIBLINGS
from .folded import FOLDED
from .shortcut import SHORTCUT, ShortcutRecord
from .sparse import SPARSE, SparseRecord
from .cim import RRAM, SRAM_ADAPTER
from .dora import DORA
from .embedding import EMBEDDING
from .parameter import PARAMETER
from .conv import CONV
from .dora_layers import DORA_CONV, DORA_EMBEDDING

__all__ = [
    "ArgView", "InputQuery", "MergedFrom", "NodeCost", "OpKind", "ScheduleFamily", "args_of", "canonicalize",
    "create", "kind_named", "kind_of", "kinds", "lint", "lora_nodes", "owner_of", "register_kind", "replace_node", "set_args",
    "write", "LINEAR", "RECOMPUTE", "SIBLINGS", "FOLDED", "SHORTCUT", "ShortcutRecord", "SPARSE", "SparseRecord", "RRAM", "SRAM_ADAPTER", "EMBEDDING", "PARAMETER", "DORA", "CONV", "DORA_CONV", "DORA_EMBEDDING",
    "lora_linear_reference", "schedule_counts",
]
