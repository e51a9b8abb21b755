"""TrainableTokens: train only some rows of an embedding, as PEFT's ``trainable_token_indices``.

Requires: a captured graph (runs after InsertLoRA and InsertShortcuts, which freeze every
parameter they find).  Provides: ``"trainable_tokens"``.
Preserves: every output at init (the trainable rows start as copies of the weight's rows).

For each selected layer, a trainable Parameter ``<module>.trainable_tokens_delta`` (k, dim)
holds the k selected rows (PEFT's name: despite it, the values that replace the rows, not a
difference); the frozen weight W is never written.  An embedding lookup reads W with those
rows replaced, computed without forming that (vocab, dim) copy::

    base = embedding(W, ids)                      # the captured lookup
    pos  = lookup[ids]                            # lookup: (vocab,) int64, row of each token in delta, -1 if none
    rows = embedding(delta, clamp_min(pos, 0))
    out  = where(pos >= 0, rows, base)            # = embedding(W.index_copy(0, idx, delta), ids)

A linear layer whose weight rows are output tokens (an lm_head, named itself or tied to
the input embedding) gets the same replacement of its output columns::

    out = index_copy(linear(h, W), -1, idx, linear(h, delta))   # = linear(h, W.index_copy(0, idx, delta))

Selection follows PEFT: a list of indices selects the input embedding (the lookup of
the ``input_ids`` placeholder; else a module named ``embed_tokens``); a dict
``{name: indices}`` selects the embedding or linear modules whose path ends with each
name.  Weights tied to a selected input embedding (lm_head with
``tie_word_embeddings=True``) use the same trainable rows, as PEFT ties them; a module
selected itself with other indices gets its own rows.  Refused: an embedding with
``scale_grad_by_freq``/``sparse``, a linear with a bias, a weight also read by an op
that is neither, a weight LoRA adapts, indices out of range or repeated.

``merge_tokens`` (called by MergeLoRA) binds W' = W.index_copy(0, idx, delta), a private
copy, in place of W and drops the replacement ops; the original W is kept as
``<weight>_lorafx_unmerged`` for ``unmerge_token_weights``.  Saved in PEFT's format as
``base_model.model.<module>.token_adapter.trainable_tokens_delta`` (``token_tensors``).
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx

from lorafx.context import CompileContext
from lorafx.dialect import kind_of
from lorafx.graph_utils import get_attr, node_module, owner_and_name
from lorafx.meta import LoraRecord, OriginRecord, get_record, set_record
from lorafx.options import Option
from lorafx.pipeline import CAPTURED, Pass, PassResult

__all__ = ["TrainableTokens", "TokensRecord", "token_records", "token_tensors", "merge_tokens", "unmerge_tokens",
           "unmerge_token_weights", "merged_token_weights", "kept_token_weights", "check_token_indices",
           "DELTA", "PEFT_DELTA"]

aten = torch.ops.aten
DELTA = "trainable_tokens_delta"  # the trainable rows, under the owning module
INDICES = "trainable_tokens_indices"  # (k,) int64 buffer
LOOKUP = "trainable_tokens_lookup"  # (vocab,) int64 buffer: the row in delta of each token, -1 for none
PEFT_DELTA = "token_adapter.trainable_tokens_delta"  # PEFT's key, after the module path
_KEPT = "_lorafx_unmerged"


@dataclass(frozen=True)
class TokensRecord:
    """One layer reading W with trainable rows: on the node giving its output."""

    module: str  # the module whose rows train (owner of delta), e.g. "model.embed_tokens"
    weight: str  # attribute path of the frozen weight
    delta: str  # attribute path of the trainable rows (k, dim)
    indices: str  # attribute path of the (k,) int64 buffer of token ids
    lookup: Optional[str]  # attribute path of the (vocab,) lookup buffer (embeddings)
    tokens: Tuple[int, ...]
    layer: str  # "Embedding" | "Linear"
    name: Optional[str] = None  # the trainable_token_indices key that selected it (None: the list form)
    tied: bool = False  # reads the rows of another module's adapter (lm_head tied to the embedding)
    merged: bool = False

    def describe(self) -> str:
        return (f"trainable_tokens({len(self.tokens)} rows of {self.module}" + (", tied" if self.tied else "")
                + (", merged" if self.merged else "") + ")")


def check_token_indices(name, value, where: str = "") -> None:
    """None, a list of token ids, or a dict {module name: list of token ids}."""
    if value is None:
        return
    fix = f"pass e.g. {name}=[0, 5] (rows of the input embedding) or {name}={{'embed_tokens': [0, 5]}}"
    groups = value.items() if isinstance(value, Mapping) else [(None, value)]
    if not isinstance(value, (Mapping, list, tuple)) or not groups:
        raise TypeError(f"{where}{name} must be a list of token ids or a dict {{module: [ids]}}, got {value!r}; {fix}")
    for key, ids in groups:
        if key is not None and (not isinstance(key, str) or not key):
            raise TypeError(f"{where}{name} keys must be module names, got {key!r}; {fix}")
        if not isinstance(ids, (list, tuple)) or not ids or not all(
                isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ValueError(f"{where}{name}{'' if key is None else f'[{key!r}]'} must be a non-empty list of token "
                             f"ids (ints >= 0), got {ids!r}; {fix}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{where}{name}{'' if key is None else f'[{key!r}]'} repeats token ids ({ids!r}): each "
                             "row can be trained once; remove the repeats")


def _is_embedding(n) -> bool:
    return n.op == "call_function" and n.target is aten.embedding.default


def _is_linear(n) -> bool:
    return n.op == "call_function" and n.target is aten.linear.default


def _arg(node, i, name, default):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _input_embedding(gm) -> Optional[str]:
    """The module of the lookup that reads the ``input_ids`` placeholder (else any placeholder)."""
    lookups = [n for n in gm.graph.nodes if _is_embedding(n) and isinstance(n.args[1], torch.fx.Node)
               and n.args[1].op == "placeholder"]
    named = [n for n in lookups if n.args[1].target == "input_ids"] or lookups
    return node_module(named[0]) if named else None


def _fake_meta(gm, nodes) -> None:
    """Fill ``meta["val"]`` of new nodes by running them on fake tensors."""
    from torch._guards import detect_fake_mode
    vals = [n.meta.get("val") for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    mode = detect_fake_mode(vals)
    if mode is None:
        return
    for n in nodes:
        def value(a):
            if isinstance(a, torch.fx.Node):
                if a.op == "get_attr":
                    return mode.from_tensor(get_attr(gm, a.target), static_shapes=True)
                return a.meta.get("val")
            return a
        args = torch.fx.node.map_aggregate(n.args, value)
        kwargs = torch.fx.node.map_aggregate(n.kwargs, value)
        with mode:
            n.meta["val"] = n.target(*args, **kwargs)


def _copy_meta(src, dst) -> None:
    for key in ("nn_module_stack", "stack_trace"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]


def apply_tokens(gm: torch.fx.GraphModule, base: torch.fx.Node, rec: TokensRecord) -> torch.fx.Node:
    """Insert the row replacement after ``base`` (the layer's lookup or linear) and give it
    ``base``'s users; returns the node computing the layer's output (carrying ``rec``)."""
    g = gm.graph
    new = []
    with g.inserting_before(base.next):  # in order, right after base
        delta = g.get_attr(rec.delta)
        if rec.layer == "Embedding":
            ids = base.args[1]
            pad = _arg(base, 2, "padding_idx", -1)
            lookup = g.get_attr(rec.lookup)
            pos = g.call_function(aten.index.Tensor, (lookup, [ids]))
            hit = g.call_function(aten.ge.Scalar, (pos, 0))
            safe = g.call_function(aten.clamp_min.default, (pos, 0))
            # a padding row gets no gradient, as in PEFT's embedding of the replaced weight
            row_pad = rec.tokens.index(pad) if isinstance(pad, int) and pad in rec.tokens else -1
            rows = g.call_function(aten.embedding.default, (delta, safe, row_pad))
            hit3 = g.call_function(aten.unsqueeze.default, (hit, -1))
            out = g.call_function(aten.where.self, (hit3, rows, base))
            new = [lookup, delta, pos, hit, safe, rows, hit3, out]
        else:
            h = base.args[0]
            idx = g.get_attr(rec.indices)
            extra = g.call_function(aten.linear.default, (h, delta))
            dim = base.meta["val"].dim() - 1 if isinstance(base.meta.get("val"), torch.Tensor) else -1
            out = g.call_function(aten.index_copy.default, (base, dim, idx, extra))
            new = [delta, idx, extra, out]
    base.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out and user not in new)
    for n in new:
        _copy_meta(base, n)
        if n.op == "call_function":
            set_record(n, OriginRecord(node_module(base), created_by="TrainableTokens"))
    set_record(out, rec)
    _fake_meta(gm, [n for n in new if n.op != "get_attr"])
    return out


def token_records(gm: torch.fx.GraphModule) -> List[Tuple[torch.fx.Node, TokensRecord]]:
    return [(n, r) for n in gm.graph.nodes for r in [get_record(n, TokensRecord)] if r is not None]


def _targets(gm, value) -> Dict[str, Tuple[Optional[str], Tuple[int, ...]]]:
    """{module path: (key, indices)} selected by ``value`` (PEFT's rules)."""
    layers = {node_module(n) for n in gm.graph.nodes if _is_embedding(n) or _is_linear(n)}
    first = None
    if isinstance(value, Mapping):
        groups = [(str(k), tuple(int(i) for i in v)) for k, v in value.items()]
    else:
        first = _input_embedding(gm)
        if first is None:
            named = sorted(m for m in layers if m.endswith("embed_tokens"))
            if not named:
                raise ValueError("TrainableTokens: trainable_token_indices is a list, which selects the input "
                                 "embedding, but this graph has no embedding lookup of its inputs and no "
                                 "'embed_tokens' module; name the module: trainable_token_indices={'<module>': [...]}")
            first = named[0]
        groups = [(None, tuple(int(i) for i in value))]
    out = {}
    for key, ids in groups:
        found = [first] if key is None else sorted(m for m in layers if m.endswith(key))
        if not found:
            raise ValueError(f"TrainableTokens: trainable_token_indices names {key!r}, but no embedding or linear "
                             f"layer of this model has a name ending with it; layers: "
                             f"{', '.join(sorted(m for m in layers if m)[:30])}")
        for m in found:
            out.setdefault(m, (key, ids))
    return out


@dataclass(frozen=True)
class TrainableTokens(Pass):
    token_indices: object = None  # list of ids, or {module: ids}

    requires = frozenset({CAPTURED})
    provides = frozenset({"trainable_tokens"})
    invalidates = frozenset({"cost"})
    options = (
        Option("trainable_token_indices", (list, dict, type(None)), None,
               "PEFT's trainable_token_indices: train only these rows of the input embedding ([0, 5]) or of named "
               "layers ({'embed_tokens': [...]}); lm_head tied to it follows; W itself is never written",
               field="token_indices", check=check_token_indices),
    )

    @classmethod
    def from_options(cls, values, ctx: CompileContext) -> Optional["TrainableTokens"]:
        value = values.get("trainable_token_indices")
        return None if value is None else cls(token_indices=value)

    def validate(self) -> None:
        check_token_indices("trainable_token_indices", self.token_indices, "TrainableTokens: ")

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        targets = _targets(gm, self.token_indices)
        # every node reading each weight (by get_attr target): plan all, validate all, then rewrite
        readers: Dict[str, List[torch.fx.Node]] = {}
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                readers.setdefault(n.target, []).extend(n.users)
        plans = []  # (owner module, key, ids, weight path, [(node, layer, tied)])
        for module, (key, ids) in targets.items():
            nodes = [n for n in gm.graph.nodes if (_is_embedding(n) or _is_linear(n)) and node_module(n) == module]
            weights = {(n.args[0] if _is_embedding(n) else n.args[1]) for n in nodes}
            if len(weights) != 1 or not all(isinstance(w, torch.fx.Node) and w.op == "get_attr" for w in weights):
                raise ValueError(f"TrainableTokens: {module} does not read one stored weight (its layers read "
                                 f"{sorted(getattr(w, 'name', str(w)) for w in weights)}); select an nn.Embedding "
                                 "or nn.Linear")
            plans.append((module, key, ids, next(iter(weights)).target, nodes))
        owners = {}  # weight path -> the plan of the input-embedding-like owner (ties follow it)
        for plan in plans:
            module, key, ids, weight, nodes = plan
            W = get_attr(gm, weight)
            if W.is_meta:
                raise ValueError(f"TrainableTokens: {module}'s weight is on the meta device; the trainable rows start "
                                 "as copies of its rows, so load the weights first")
            bad = [i for i in ids if i >= W.shape[0]]
            if bad:
                raise ValueError(f"TrainableTokens: token id(s) {bad[:5]} out of range for {module}, which has "
                                 f"{W.shape[0]} rows; use ids below {W.shape[0]} (resize the embedding first for "
                                 "new tokens)")
            for n in nodes:
                self._check_layer(n, module)
            if any(_is_embedding(n) for n in nodes):
                owners.setdefault(weight, plan)
        targeted = {n for plan in plans for n in plan[4]}
        rewrites = []  # (node, layer, owner plan, tied)
        for plan in plans:
            rewrites += [(n, "Embedding" if _is_embedding(n) else "Linear", plan, False) for n in plan[4]]
        for weight, plan in owners.items():
            for user in readers.get(weight, []):
                if user in targeted:
                    continue
                if kind_of(user) is not None or get_record(user, LoraRecord) is not None:
                    raise ValueError(f"TrainableTokens: {plan[0]}'s weight is also adapted by LoRA at "
                                     f"{node_module(user)}; train its rows or adapt it, not both")
                if not (_is_embedding(user) and user.args[0].target == weight) and not (
                        _is_linear(user) and user.args[1].target == weight):
                    raise ValueError(f"TrainableTokens: {plan[0]}'s weight is also read by {user.name} "
                                     f"({user.target}) in {node_module(user) or 'the model'}, which is neither an "
                                     "embedding lookup nor a linear layer; lorafx cannot give it the trainable rows")
                self._check_layer(user, node_module(user))
                rewrites.append((user, "Embedding" if _is_embedding(user) else "Linear", plan, True))
        for plan in plans:  # a weight LoRA adapts cannot also train rows
            for user in readers.get(plan[3], []):
                if kind_of(user) is not None:
                    raise ValueError(f"TrainableTokens: {plan[0]}'s weight is adapted by LoRA at {node_module(user)}; "
                                     "train its rows (trainable_token_indices) or adapt it (target_modules), not both")
        # all checked: create the tensors, then rewrite
        made = {}
        for plan in plans:
            module, key, ids, weight, nodes = plan
            W = get_attr(gm, weight)
            share = next((m for m, p in made.items() if p[0][3] == weight and p[0][2] == ids), None)
            if share is not None:  # a tied layer selected with the same ids: PEFT ties it to the embedding
                made[module] = (plan, made[share][1])
                continue
            owner = gm.get_submodule(module)
            index = torch.tensor(ids, dtype=torch.long, device=W.device)
            owner.register_parameter(DELTA, torch.nn.Parameter(W.detach()[index].clone(), requires_grad=True))
            owner.register_buffer(INDICES, index, persistent=False)
            paths = (f"{module}.{DELTA}", f"{module}.{INDICES}", None)
            if any(_is_embedding(n) for n in nodes):
                lookup = torch.full((W.shape[0],), -1, dtype=torch.long, device=W.device)
                lookup[index] = torch.arange(len(ids), device=W.device)
                owner.register_buffer(LOOKUP, lookup, persistent=False)
                paths = (paths[0], paths[1], f"{module}.{LOOKUP}")
            made[module] = (plan, paths)
        for node, layer, plan, tied in rewrites:
            module, key, ids, weight, _ = plan
            delta, indices, lookup = made[module][1]
            if layer == "Embedding" and lookup is None:
                raise AssertionError("an embedding without its lookup buffer")
            rec = TokensRecord(module=module, weight=weight, delta=delta, indices=indices, lookup=lookup,
                               tokens=tuple(ids), layer=layer, name=key, tied=tied or made[module][1][0] != f"{module}.{DELTA}")
            apply_tokens(gm, node, rec)
        gm.graph.eliminate_dead_code()
        info = {"token_layers": len(rewrites), "trainable_rows": sum(len(p[2]) for p in plans)}
        return PassResult(gm, True, info)

    @staticmethod
    def _check_layer(n, module) -> None:
        if _is_embedding(n):
            if _arg(n, 3, "scale_grad_by_freq", False) or _arg(n, 4, "sparse", False):
                raise ValueError(f"TrainableTokens: {module} is an embedding with scale_grad_by_freq or sparse "
                                 "gradients, which lorafx's trainable rows do not reproduce; turn them off")
        elif n.args[2:3] and n.args[2] is not None or n.kwargs.get("bias") is not None:
            raise ValueError(f"TrainableTokens: {module} is a linear layer with a bias; lorafx trains rows of a "
                             "bias-free output layer only (an lm_head)")


# -- merging ------------------------------------------------------------------------------------------------

def _merged(gm, rec: TokensRecord) -> torch.Tensor:
    W = get_attr(gm, rec.weight)
    delta = get_attr(gm, rec.delta).detach()
    index = torch.tensor(rec.tokens, dtype=torch.long, device=W.device)
    return W.detach().index_copy(0, index, delta.to(W.dtype))


def _rebind(gm: torch.nn.Module, old: torch.Tensor, new: torch.nn.Parameter) -> None:
    """Bind ``new`` in every slot of ``gm`` holding ``old`` (a tied weight's other names too)."""
    for module in gm.modules():
        for key, p in module._parameters.items():
            if p is old:
                module._parameters[key] = new


def merged_token_weights(gm: torch.fx.GraphModule, aliases: bool = False) -> Dict[str, torch.Tensor]:
    """{weight path: W with the trainable rows written} for every unmerged layer of ``gm``;
    ``aliases``: under every path of a tied W too (``merged_state_dict``)."""
    out = {}
    for _, rec in token_records(gm):
        if not rec.merged:
            out.setdefault(rec.weight, _merged(gm, rec))
    if aliases and out:
        held = {id(get_attr(gm, path)): path for path in out}
        for path, p in gm.named_parameters(remove_duplicate=False):
            if id(p) in held:
                out.setdefault(path, out[held[id(p)]])
    return out


def merge_tokens(gm: torch.fx.GraphModule, unload: bool = False, rebind: bool = True) -> int:
    """Bind W' = W.index_copy(0, idx, delta) (a private copy) in place of each W with
    trainable rows and drop the replacement ops; the original is kept as
    ``<weight>_lorafx_unmerged`` (``unload``: not kept, and delta and its buffers deleted).
    Returns how many layers it rewrote."""
    done = token_records(gm)
    if rebind:
        for path, merged in merged_token_weights(gm).items():
            owner, name = owner_and_name(gm, path)
            if hasattr(owner, name + _KEPT):
                continue
            old = owner._parameters[name]
            if not unload:
                owner.register_buffer(name + _KEPT, old.data, persistent=False)
            _rebind(gm, old, torch.nn.Parameter(merged, requires_grad=False))
    for node, rec in done:
        if rec.merged:
            continue
        base = node.args[2] if rec.layer == "Embedding" else node.args[0]
        node.replace_all_uses_with(base)
        gm.graph.erase_node(node)
        if not unload:
            set_record(base, TokensRecord(**{**rec.__dict__, "merged": True}))
    gm.graph.eliminate_dead_code()
    if unload:
        for _, rec in done:
            for path in (rec.delta, rec.indices, rec.lookup):
                if path is None:
                    continue
                owner, name = owner_and_name(gm, path)
                if hasattr(owner, name):
                    delattr(owner, name)
            owner, name = owner_and_name(gm, rec.weight)
            if hasattr(owner, name + _KEPT):
                delattr(owner, name + _KEPT)
    if done:
        gm.recompile()
    return len([1 for _, rec in done if not rec.merged])


def kept_token_weights(gm: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """{weight path: the unmerged W} of every merged layer with trainable rows (every name of a tied W)."""
    out = {}
    graph_module = gm.graph_module if hasattr(gm, "graph_module") else gm
    for _, rec in token_records(graph_module):
        owner, name = owner_and_name(gm, rec.weight)
        kept = getattr(owner, name + _KEPT, None)
        if kept is not None:
            merged = owner._parameters[name]
            out.update({path: kept for path, p in gm.named_parameters(remove_duplicate=False) if p is merged})
    return out


def unmerge_token_weights(gm: torch.nn.Module, graph_module: Optional[torch.fx.GraphModule] = None) -> None:
    """Bind the kept unmerged weights back (the graphs are the caller's to restore)."""
    graph_module = graph_module if graph_module is not None else gm
    for _, rec in token_records(graph_module):
        owner, name = owner_and_name(gm, rec.weight)
        kept = getattr(owner, name + _KEPT, None)
        if kept is not None:
            _rebind(gm, owner._parameters[name], torch.nn.Parameter(kept, requires_grad=False))
            delattr(owner, name + _KEPT)


def unmerge_tokens(gm: torch.fx.GraphModule, rebind: bool = True) -> int:
    """Rebuild the replacement ops after each merged layer (a graph captured while merged)."""
    if rebind:
        unmerge_token_weights(gm)
    count = 0
    for node, rec in token_records(gm):
        if rec.merged:
            records = node.meta.get("lorafx", {})
            records.pop(TokensRecord.__name__, None)
            apply_tokens(gm, node, TokensRecord(**{**rec.__dict__, "merged": False}))
            count += 1
    if count:
        gm.recompile()
    return count


def token_tensors(gm: torch.nn.Module) -> Dict[str, str]:
    """{PEFT key without ``base_model.model.``: delta path} of every trainable-rows adapter
    (a tied layer's rows are its owner's: saved once)."""
    graph_module = gm.graph_module if hasattr(gm, "graph_module") else gm
    out = {}
    for _, rec in token_records(graph_module):
        owner = rec.delta.rsplit(".", 1)[0]
        out.setdefault(f"{owner}.{PEFT_DELTA}", rec.delta)
    return out
