"""Several adapters on one compiled model: PEFT's ``add_adapter``, ``set_adapter``,
``disable_adapter``, ``delete_adapter`` and multi-adapter save layout.

The compile's own adapter is named ``"default"`` (PEFT's name); its tensors keep their
paths (``<site>.lora_A`` / ``<site>.lora_B``, so state-dict keys do not change).  An adapter
added with ``cm.add_adapter(name, **options)`` gets its own tensors at
``<site>.lora_A_<name>`` / ``<site>.lora_B_<name>``, created on the sites its
``target_modules`` selects and initialised as ``lorafx.compile`` would with the same
options and seed (its own seed).  As in PEFT, a new adapter is not active and does not
train until ``set_adapter`` names it; only active adapters have ``requires_grad``.

Every captured graph (one per call signature, ``cm._variants``) holds one node per
adapted site.  Switching rewrites each graph in place, never capturing again: the graph is
first canonicalised (``lorafx.dialect.canonicalize``: fused siblings, folded A, recompute
and keep-XA forms become single-adapter nodes), then

* a site whose active adapters change becomes its kind's plain base op (``base_op``,
  tagged with an ``AdapterSlot`` record so the site is found again);
* a site with one active adapter gets that adapter's node (the kind's ``unmerge`` from the
  base op, or ``insert`` for a site no adapter had adapted in this graph yet);
* a site with several active adapters gets one node whose A is the row-concatenation of
  their A's and whose B is the column-concatenation of ``scale_i·B_i``, with scale 1 (the
  ``cat``/``mul`` nodes are in the graph, so each adapter gets its own gradient):
  ``Σ scale_i·B_i A_i x``, PEFT's sum, exactly for dropout 0.  Several active adapters with
  dropout > 0 at one site are refused while training (PEFT draws one mask per adapter; one
  node has one mask), and they run without dropout in eval as in PEFT.  Only kinds with
  ``combinable = True`` (``lora_linear``) are combined; a DoRA site, whose output is not
  a sum of adapter deltas, is refused.

What a switch costs: one walk over every graph's nodes and a recompile of each (about
the cost of one pass, milliseconds for a small model); the rewritten graphs run the
default schedule (the compile's schedule choice, fused siblings and folding are not
re-run).  Switching back to ``"default"`` alone restores the compile's optimised graphs
(they were kept at the first switch).  ``add_adapter`` captures the model once to find
its sites, as compile does.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx

from lorafx.passes.insert_lora import InsertLoRA, draw_A, find_adapter_sites, select_linear_sites
from lorafx.passes.peft_init import is_residual_init
from lorafx.passes.merge_lora import _KEPT
from lorafx.passes.set_training_mode import set_training_mode

from .capture import capture
from .adapter_io import copy_adapter_weights, read_adapter_files, save_adapter as _save_one, compile_settings
from .dialect import canonicalize, kind_named, kind_of
from .dialect.registry import copy_meta, set_args
from .graph_utils import del_attr, get_attr, owner_and_name, set_parameter
from .meta import LoraRecord, get_record, graph_record, records as node_records, set_record
from .peft_names import ALIASES

__all__ = ["DEFAULT", "ADD_OPTIONS", "ActiveAdapters", "AdapterSlot", "AdapterState", "add_adapter", "set_adapter",
           "disable_adapters", "delete_adapter", "adapter_records", "active_adapters", "active_records",
           "merge", "merge_and_unload", "save_adapters", "load_adapter", "prepare_variant", "all_records",
           "check_rebuild", "check_training"]

log = logging.getLogger("lorafx")

DEFAULT = "default"
# the InsertLoRA options add_adapter takes
ADD_OPTIONS = ("r", "alpha", "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern", "use_rslora",
               "dropout", "init", "seed", "adapter_dtype", "autocast_adapter_dtype")
_NAME = re.compile(r"[A-Za-z0-9_]+")
aten = torch.ops.aten


@dataclass(frozen=True)
class ActiveAdapters:
    """On an adapter node that computes several adapters at once: their names, in order (the
    node's LoraRecord is the first one's)."""

    names: Tuple[str, ...]

    def describe(self) -> str:
        return "adapters " + "+".join(self.names)


@dataclass(frozen=True)
class AdapterSlot:
    """On the plain base op standing for an adapter site that no active adapter adapts now."""

    site: str
    kind: str

    def describe(self) -> str:
        return "no active adapter"


@dataclass
class AdapterState:
    """What a compiled model with named adapters knows about them (``cm._adapter_state``)."""

    records: Dict[str, Dict[str, LoraRecord]]  # adapter -> {site: record}, "default" first
    options: Dict[str, dict]  # adapter -> the options it was created with ({} for the compile's)
    active: List[str]
    disabled: bool = False
    optimised: Dict[tuple, torch.fx.Graph] = field(default_factory=dict)  # variant key -> the compile's graph
    train_problem: Optional[str] = None  # why the graphs cannot train now (several adapters with dropout)
    default_compiled: bool = True  # "default" is the compile's own adapter (not deleted and loaded again)

    def owner(self) -> Dict[str, Tuple[str, LoraRecord]]:
        """{lora_A path: (adapter name, its record)}."""
        return {rec.lora_A: (name, rec) for name, recs in self.records.items() for rec in recs.values()}

    def wanted(self) -> Dict[str, List[Tuple[str, LoraRecord]]]:
        """{site: [(adapter, record)]} of the active adapters (none while disabled)."""
        out: Dict[str, List[Tuple[str, LoraRecord]]] = {}
        if not self.disabled:
            for name in self.active:
                for site, rec in self.records[name].items():
                    out.setdefault(site, []).append((name, rec))
        return out


# -- state ------------------------------------------------------------------------------------------

def _state(cm, create: bool = False) -> Optional[AdapterState]:
    st = cm.__dict__.get("_adapter_state")
    if st is None and create:
        recs = {s: dataclasses.replace(r, merged=False) for s, r in cm._graph_lora_records().items()}
        st = AdapterState({DEFAULT: recs}, {DEFAULT: {}}, [DEFAULT])
        cm.__dict__["_adapter_state"] = st
    return st


def _names(st: Optional[AdapterState]) -> List[str]:
    return list(st.records) if st is not None else [DEFAULT]


def active_adapters(cm) -> List[str]:
    st = _state(cm)
    return list(st.active) if st is not None else [DEFAULT]


def adapter_records(cm, name: str) -> Dict[str, LoraRecord]:
    """{site: LoraRecord} of adapter ``name``."""
    st = _state(cm)
    if st is None:
        if name != DEFAULT:
            raise KeyError(f"this model has no adapter named {name!r}; its adapters: ['default']")
        return cm._graph_lora_records()
    _check_exists(st, name)
    return dict(st.records[name])


def active_records(cm) -> Dict[str, LoraRecord]:
    """``cm.lora_records()`` of a model with named adapters: the first active adapter's
    records (merged while the model is merged)."""
    st = _state(cm)
    if not st.active:
        return {}
    recs = st.records[st.active[0]]
    return {s: dataclasses.replace(r, merged=True) for s, r in recs.items()} if cm.merged else dict(recs)


def all_records(cm) -> List[LoraRecord]:
    """The records of every adapter (for the weights a merge rebinds)."""
    st = _state(cm)
    if st is None:
        return list(cm._graph_lora_records().values())
    return [rec for recs in st.records.values() for rec in recs.values()]


def _check_exists(st: AdapterState, name) -> None:
    if not isinstance(name, str) or name not in st.records:
        raise KeyError(f"this model has no adapter named {name!r}; its adapters: {list(st.records)}")


def _tensor_paths(rec: LoraRecord) -> List[str]:
    """The attribute paths of an adapter's trainable tensors at one site."""
    return list(dict.fromkeys([rec.lora_A, rec.lora_B, *kind_named(rec.kind).peft_tensors(rec).values()]))


def _set_trainable(cm, st: AdapterState, frozen: bool = False) -> None:
    """PEFT's rule: the active adapters' tensors train (unless ``frozen``), the others are frozen."""
    for name, recs in st.records.items():
        for rec in recs.values():
            for path in _tensor_paths(rec):
                t = get_attr(cm, path)
                if isinstance(t, torch.nn.Parameter):
                    t.requires_grad_(name in st.active and not frozen)


# -- adding ---------------------------------------------------------------------------------------

def add_adapter(cm, name: str, **options) -> None:
    """Create adapter ``name`` with its own InsertLoRA options (see ``ADD_OPTIONS``) on the
    sites they select, initialised as compile would with the same options and seed; it is not
    active (and frozen) until ``set_adapter`` names it.  Nothing changes if anything is refused."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"add_adapter: an adapter name is letters, digits and '_' (it becomes part of the tensor "
                         f"names <site>.lora_A_<name>), got {name!r}")
    for peft, (mine, convert) in ALIASES.items():  # PEFT's names: lora_alpha, lora_dropout, init_lora_weights
        if peft in options:
            if mine in options:
                raise TypeError(f"add_adapter got both {mine}={options[mine]!r} and {peft}={options[peft]!r}, which "
                                f"are the same option ({peft} is PEFT's name for {mine}); pass one of them")
            options[mine] = convert(options.pop(peft))
    unknown = sorted(set(options) - set(ADD_OPTIONS))
    if unknown:
        raise TypeError(f"add_adapter: unknown option(s) {unknown}; it takes {', '.join(ADD_OPTIONS)} (and PEFT's "
                        f"names {', '.join(ALIASES)}); compile a separate model for the others")
    st = _state(cm)
    if name in _names(st):
        raise ValueError(f"add_adapter: this model already has an adapter named {name!r}; pick another name or "
                         f"cm.delete_adapter({name!r}) first")
    _refuse_unsupported(cm, "add_adapter")
    if options.get("init") == "lors":
        raise ValueError("add_adapter: init='lors' needs calibration data, which add_adapter does not take; use "
                         "init='kaiming' or 'gaussian', or compile a separate model with init='lors'")
    if is_residual_init(options.get("init")):
        raise ValueError(f"add_adapter: init={options['init']!r} replaces the frozen weights by residuals, which "
                         "every adapter of the model reads; use init='kaiming', 'gaussian' or False, or compile a "
                         f"separate model with init={options['init']!r}")
    ilora = InsertLoRA(**options)  # validates every option, naming the bad one
    ilora.validate()
    if cm.merged:
        raise RuntimeError("add_adapter: this model is merged (cm.merge()); call cm.unmerge() first")
    try:
        cm.source_model  # (a loaded program has none)
    except RuntimeError as e:
        raise ValueError(f"add_adapter captures the source model to find the adapter's sites, and {e}") from None
    seed = ilora.seed if ilora.seed is not None else int(torch.randint(0, 2**62, ()).item())
    recs, tensors = _new_adapter(cm, name, ilora, seed)
    st = _state(cm, create=True)
    for path, value in tensors.items():
        set_parameter(cm.graph_module, path, value)
    st.records[name] = recs
    st.options[name] = {**{k: v for k, v in options.items()}, "seed": seed}


def _refuse_unsupported(cm, what: str) -> None:
    if cm.target == "cim":
        raise ValueError(f"{what} is not supported with target='cim': its chip is placed and programmed for one "
                         "adapter's layout. Compile one model per adapter")
    if cm.shortcut_records():
        raise ValueError(f"{what} is not supported on a model with shortcut adapters (shortcuts=True), which "
                         "always run and are not named adapters; compile without shortcuts to use named adapters")
    if cm.__dict__.get("_materialized_on") is not None:
        raise ValueError(f"{what} is not supported on a model planned on the meta device and materialized; compile "
                         "the loaded model to use named adapters")


def _fresh_capture(cm) -> torch.fx.GraphModule:
    """The source model captured as compile captured it (its sites are read, nothing runs)."""
    ctx = cm._context
    training = graph_record(cm.graph_module).captured_training if cm._mode_dependent else None
    return capture(cm._source, ctx.example_args, ctx.example_kwargs, dynamic=cm.dynamic, training=training)


def _new_adapter(cm, name: str, ilora: InsertLoRA, seed: int):
    """({site: record}, {path: Parameter}) of a new adapter, drawn as InsertLoRA draws them."""
    gm = _fresh_capture(cm)
    sites = select_linear_sites(gm, find_adapter_sites(gm), ilora.target_modules, ilora.exclude_modules,
                                where="add_adapter")
    configs = [ilora.site_config(s) for s in sites]
    gen = torch.Generator().manual_seed(seed)
    recs: Dict[str, LoraRecord] = {}
    tensors: Dict[str, torch.nn.Parameter] = {}
    for site, (r, alpha) in zip(sites, configs):
        if site.module in recs:
            continue  # a module called twice shares its adapter
        W = get_attr(cm, site.weight.target)
        if W.is_meta:
            raise ValueError("add_adapter: the base weights are on the meta device; load them first")
        paths = {}
        init = "kaiming" if ilora.init is False else ilora.init
        for tname, (shape, rule) in kind_named(site.kind).adapter_init(site, r, init).items():
            if ilora.init is False and rule == "zeros":
                rule = "kaiming"  # init=False: every tensor drawn (PEFT's rule, as InsertLoRA)
            value = draw_A(shape, rule, r, gen)
            path = f"{site.module}.{tname}" if name == DEFAULT else f"{site.module}.{tname}_{name}"
            _refuse_taken(cm, path)
            tensors[path] = torch.nn.Parameter(value.to(dtype=ilora.dtype_for(W.dtype), device=W.device),
                                               requires_grad=False)
            paths[tname] = path
        scale = alpha / r ** 0.5 if ilora.use_rslora else alpha / r
        bias = site.bias.target if isinstance(site.bias, torch.fx.Node) and site.bias.op == "get_attr" else None
        recs[site.module] = LoraRecord(site=site.module, weight=site.weight.target, lora_A=paths["lora_A"],
                                       lora_B=paths["lora_B"], r=r, alpha=alpha, scale=scale,
                                       in_features=site.in_features, out_features=site.out_features, bias=bias,
                                       dropout=ilora.dropout, weight_transposed=site.weight_transposed,
                                       kind=site.kind, layer=site.layer, adapter=name)
    return recs, tensors


def _refuse_taken(cm, path: str) -> None:
    try:
        get_attr(cm, path)
    except AttributeError:
        return
    raise ValueError(f"add_adapter: this model already has an attribute {path!r}; pick another adapter name")


# -- switching ------------------------------------------------------------------------------------

def set_adapter(cm, names: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
    """Make ``names`` (one adapter, or several whose deltas add) the active adapters: they run
    and train (frozen too with ``inference_mode=True``, PEFT's option), the others are frozen and
    skipped.  Unmerges a merged model first, as PEFT does (with a warning).  The graphs are
    rewritten in place, never captured again."""
    wanted = [names] if isinstance(names, str) else list(names)
    st = _state(cm)
    for n in wanted:
        if n not in _names(st):
            raise KeyError(f"set_adapter: this model has no adapter named {n!r}; its adapters: {_names(st)}")
    if not wanted or len(set(wanted)) != len(wanted):
        raise ValueError(f"set_adapter: name one adapter or several distinct ones, got {names!r}")
    if st is None and wanted == [DEFAULT] and not inference_mode:
        return
    _refuse_unsupported(cm, "set_adapter")
    st = _state(cm, create=True)
    _check_combinable(st, wanted)
    if cm.merged:
        warnings.warn("set_adapter: this model was merged; unmerging it first (as PEFT does)")
        cm.unmerge()
    st.active = wanted
    _apply(cm, st)
    _set_trainable(cm, st, frozen=inference_mode)


def _check_combinable(st: AdapterState, active: List[str]) -> None:
    by_site: Dict[str, List[Tuple[str, LoraRecord]]] = {}
    for name in active:
        for site, rec in st.records[name].items():
            by_site.setdefault(site, []).append((name, rec))
    for site, recs in by_site.items():
        if len(recs) > 1:
            kind = kind_named(recs[0][1].kind)
            extra = next((r for _, r in recs if r.magnitude or r.lora_bias), None)
            if extra is not None:
                raise ValueError(f"set_adapter: adapters {[n for n, _ in recs]} all adapt {site}, and "
                                 f"{extra.adapter!r} has {'a DoRA magnitude' if extra.magnitude else 'a lora_bias'}: "
                                 "lorafx runs several adapters at one site together only as plain LoRA deltas; "
                                 "activate one of them")
            if not kind.combinable:
                raise ValueError(f"set_adapter: adapters {[n for n, _ in recs]} all adapt {site} ({kind.name}), and "
                                 f"lorafx cannot run several {kind.name} adapters at one site together; activate "
                                 "one of them")


@contextlib.contextmanager
def disable_adapters(cm):
    """Run the base model: every adapter site becomes its plain base op inside the block
    (outputs equal the source model's exactly); the adapters come back on exit, also on an
    exception.  A merged model is unmerged inside and merged again on exit."""
    _refuse_unsupported(cm, "disable_adapters")
    st = _state(cm, create=True)
    if st.disabled:
        yield cm
        return
    was_merged = cm.merged
    merged_names = list(st.active) if was_merged else None
    cm.unmerge()
    kept = {key: copy.deepcopy(gm.graph) for key, gm in cm._variants.items()}  # put back exactly on exit
    before = (list(st.active), list(st.records))
    st.disabled = True
    try:
        _apply(cm, st)
        yield cm
    finally:
        st.disabled = False
        unchanged = before == (list(st.active), list(st.records))  # no set/add/delete_adapter inside
        for key, gm in cm._variants.items():
            if key in kept and unchanged:
                gm.graph = kept[key]
                gm.recompile()
                set_training_mode(gm, _mode(cm, key))
            else:  # captured inside the block, or the adapters changed there
                apply_graph(gm, st.wanted(), st.owner())
        st.train_problem = _train_problem(st.wanted())
        cm._compiled.clear()
        if was_merged:
            merge(cm, merged_names)


def delete_adapter(cm, name: str) -> None:
    """Delete adapter ``name`` and its tensors.  The last adapter cannot be deleted (the model
    would have none: use ``cm.source_model``), nor one while the model is merged (PEFT's
    rule).  Deleting an active adapter leaves the other active ones, or, if none is left,
    activates the first remaining adapter by name, with a warning (PEFT's rule)."""
    st = _state(cm)
    if st is None:
        st = _state(cm, create=True) if name == DEFAULT else None
        if st is None:
            raise KeyError(f"delete_adapter: this model has no adapter named {name!r}; its adapters: ['default']")
    _check_exists(st, name)
    if len(st.records) == 1:
        raise ValueError(f"delete_adapter: {name!r} is this model's last adapter; a compiled model keeps at least one "
                         "(the base model is cm.source_model, and cm.disable_adapters() runs it)")
    if cm.merged:
        raise ValueError(f"delete_adapter: this model is merged; call cm.unmerge() before deleting {name!r}")
    active = [n for n in st.active if n != name]
    if not active:
        active = [sorted(n for n in st.records if n != name)[0]]
        warnings.warn(f"delete_adapter: adapter {name!r} was active and is now deleted; the active adapter is now "
                      f"{active[0]!r}")
    _check_combinable(st, active)
    st.active = active
    _apply(cm, st)
    recs = st.records.pop(name)
    st.options.pop(name, None)
    if name == DEFAULT:
        st.optimised.clear()
        st.default_compiled = False
    for rec in recs.values():
        for path in _tensor_paths(rec):
            try:
                del_attr(cm.graph_module, path)
            except AttributeError:
                pass
    _set_trainable(cm, st)


def _apply(cm, st: AdapterState) -> None:
    """Rewrite every graph of ``cm`` to run the active adapters (none while disabled)."""
    wanted = st.wanted()
    owner = st.owner()
    pristine = not st.disabled and st.active == [DEFAULT]
    for key, gm in list(cm._variants.items()):
        if key not in st.optimised and _runs_default_only(gm, owner):
            st.optimised[key] = copy.deepcopy(gm.graph)
        if pristine and key in st.optimised:
            gm.graph = copy.deepcopy(st.optimised[key])
            gm.recompile()
            set_training_mode(gm, _mode(cm, key))
            continue
        apply_graph(gm, wanted, owner)
    st.train_problem = _train_problem(wanted)
    cm._compiled.clear()


def _mode(cm, key) -> bool:
    """The training mode of the graph under ``key`` (fixed for a model with batch norm)."""
    return key[1] if key[1] is not None else cm.training


def _runs_default_only(gm, owner) -> bool:
    for node in gm.graph.nodes:
        if get_record(node, ActiveAdapters) is not None or get_record(node, AdapterSlot) is not None:
            return False
        kind = kind_of(node)
        for rec in (kind.adapters(node) if kind is not None else ()):
            if owner.get(rec.lora_A, (DEFAULT,))[0] != DEFAULT:
                return False
    return True


def _train_problem(wanted) -> Optional[str]:
    for site, recs in wanted.items():
        if len(recs) > 1 and any(rec.dropout > 0 for _, rec in recs):
            return (f"adapters {[n for n, _ in recs]} are active together at {site} and one has dropout > 0: "
                    "lorafx runs them in one node with one dropout mask, where PEFT draws one per adapter, so it does "
                    "not train them together. Train them one at a time (cm.set_adapter(name)), or with dropout=0; "
                    "in eval() (or under torch.no_grad()) they run together, without dropout, as in PEFT")
    return None


def check_training(cm) -> None:
    """Raise if the active adapters cannot train together (forward in training mode)."""
    st = _state(cm)
    if st is not None and st.train_problem and not st.disabled:
        raise RuntimeError(st.train_problem)


def _node_adapters(node, kind, owner) -> Optional[Tuple[str, Tuple[str, ...]]]:
    """(site, active adapter names) of an adapter node; None for nodes without adapters (a
    shortcut).  A node of no current adapter (a new signature's "default" after "default" was
    deleted) is named "" (it never matches, so it is replaced)."""
    multi = get_record(node, ActiveAdapters)
    recs = kind.adapters(node)
    if not recs:
        return None
    if multi is not None:
        return recs[0].site, multi.names
    rec = recs[0]
    name, expected = owner.get(rec.lora_A, ("", None))
    same = expected is not None and dataclasses.replace(rec, merged=False) == expected
    return rec.site, (name if same else "",)


def _base_op(gm, kind, node) -> torch.fx.Node:
    """The kind's plain base op for ``node`` (before it), given node's users, tagged as a slot."""
    g = gm.graph
    with g.inserting_before(node):
        base = kind.base_op(g, node)
    copy_meta(node, base)
    if "val" in node.meta:
        base.meta["val"] = node.meta["val"]
    rec = kind.adapters(node)[0]
    set_record(base, AdapterSlot(rec.site, kind.name))
    node.replace_all_uses_with(base)
    g.erase_node(node)
    return base


def _combine(gm, node, recs: List[Tuple[str, LoraRecord]]) -> None:
    """Make ``node`` (built for the first record) compute every adapter of ``recs``: A the
    row-concatenation of the A's, B the column-concatenation of scale_i·B_i, scale 1."""
    g = gm.graph
    kind = kind_of(node)
    with g.inserting_before(node):
        As = [g.get_attr(rec.lora_A) for _, rec in recs]
        Bs = [g.get_attr(rec.lora_B) for _, rec in recs]
        Bs = [B if rec.scale == 1.0 else g.call_function(aten.mul.Tensor, (B, float(rec.scale)))
              for B, (_, rec) in zip(Bs, recs)]
        a = g.call_function(aten.cat.default, (As, 0))
        b = g.call_function(aten.cat.default, (Bs, 1))
    copy_meta(node, a, b, *As, *Bs)
    set_args(node, lora_A=a, lora_B=b, scale=1.0)
    set_record(node, ActiveAdapters(tuple(n for n, _ in recs)))
    assert kind is not None


def apply_graph(gm: torch.fx.GraphModule, wanted: Dict[str, List[Tuple[str, LoraRecord]]],
                owner: Dict[str, str]) -> None:
    """Rewrite one graph so that each site runs the adapters ``wanted`` gives it (see the
    module docstring); sites already right are left as they are."""
    g = gm.graph
    canonicalize(g)
    train = graph_record(gm).training is not False
    slots: List[torch.fx.Node] = []
    seen: set = set()
    for node in list(g.nodes):
        kind = kind_of(node)
        if kind is not None:
            current = _node_adapters(node, kind, owner)
            if current is None:
                continue
            site, names = current
            seen.add(site)
            if names == tuple(n for n, _ in wanted.get(site, ())):
                continue
            slots.append(_base_op(gm, kind, node))
        elif get_record(node, AdapterSlot) is not None:
            seen.add(get_record(node, AdapterSlot).site)
            slots.append(node)
    for base in slots:
        recs = wanted.get(get_record(base, AdapterSlot).site)
        if not recs:
            continue
        rec = recs[0][1]
        kind = kind_named(rec.kind)
        with g.inserting_before(base):
            new = kind.unmerge(g, base, rec, train=train, created_by="set_adapter")
        for key in ("nn_module_stack", "stack_trace", "val"):
            if key in base.meta:
                new.meta[key] = base.meta[key]
        base.replace_all_uses_with(new)
        g.erase_node(base)
        if len(recs) > 1:
            _combine(gm, new, recs)
    missing = set(wanted) - seen
    if missing:
        replaced: Dict[torch.fx.Node, torch.fx.Node] = {}
        for site in find_adapter_sites(gm):
            recs = wanted.get(site.module) if site.module in missing else None
            if not recs or get_record(site.node, AdapterSlot) is not None:
                continue
            rec = recs[0][1]
            x = replaced.get(site.x, site.x)
            new = kind_named(rec.kind).insert(gm, site, rec, x, train=train, created_by="add_adapter")
            replaced[site.node] = new
            if len(recs) > 1:
                _combine(gm, new, recs)
    _drop_unused_get_attrs(g)  # first: a deleted adapter's (eliminate_dead_code lints the targets)
    g.eliminate_dead_code()
    _drop_unused_get_attrs(g)
    g.lint()
    gm.recompile()


def _drop_unused_get_attrs(g: torch.fx.Graph) -> None:
    for node in list(g.nodes):
        if node.op == "get_attr" and not node.users:
            g.erase_node(node)


def prepare_variant(cm, gm: torch.fx.GraphModule) -> None:
    """A graph captured for a new call signature: run the model's active adapters (it was
    built with "default")."""
    st = _state(cm)
    if st is not None and not (st.active == [DEFAULT] and not st.disabled and st.default_compiled):
        apply_graph(gm, st.wanted(), st.owner())


def check_rebuild(cm) -> None:
    """Refuse rebuilding the graphs (``lorafx.ReallocateRanks``) of a model with several adapters."""
    st = _state(cm)
    if st is None:
        return
    if len(st.records) > 1 or st.active != [DEFAULT] or st.disabled:
        raise RuntimeError(
            f"cannot rebuild the graphs (e.g. lorafx.ReallocateRanks) of a model with adapters {list(st.records)} "
            f"(active: {st.active}): the rebuild recompiles the compile's 'default' adapter only. Delete the other "
            "adapters (cm.delete_adapter) and cm.set_adapter('default') first, or compile one model per adapter")
    cm.__dict__["_adapter_state"] = None  # the rebuilt graph's records are read from it again


# -- merging ---------------------------------------------------------------------------------------

def merge(cm, names: Optional[Sequence[str]] = None) -> None:
    """Fold adapters ``names`` (default: the active ones) into the frozen weights: the model
    then computes W + Σ scale_i·B_i A_i at each site.  ``names`` become the active adapters
    (as ``set_adapter(names)``), and stay so after ``unmerge()``, so that every unmerge/merge
    pair (``load_state_dict`` on a merged model, ...) merges the same adapters again; PEFT's
    ``merge_adapter(names)`` leaves the active set alone (its merged layers skip it anyway)."""
    st = _state(cm)
    if names is None:
        cm._merge_active()
        return
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        if n not in _names(st):
            raise KeyError(f"merge: this model has no adapter named {n!r}; its adapters: {_names(st)}")
    if cm.merged:
        if st is not None and names == st.active:
            return
        if st is None and names == [DEFAULT]:
            return
        raise ValueError(f"merge: this model is merged already (adapters {active_adapters(cm)}); call cm.unmerge() "
                         f"before merging {names}")
    if st is None and names == [DEFAULT]:
        cm._merge_active()
        return
    st = _state(cm, create=True)
    _check_combinable(st, names)
    if names != st.active:
        st.active = names
        _apply(cm, st)
        _set_trainable(cm, st)
    cm._merge_active()


def merge_weights(cm) -> None:
    """Bind W + Σ scale_i·B_i A_i (each adapter's ``merged_weight`` in turn, as PEFT adds them)
    at every site where several adapters are active; MergeLoRA then leaves those weights."""
    st = _state(cm)
    if st is None:
        return
    for site, recs in st.wanted().items():
        if len(recs) < 2:
            continue
        rec0 = recs[0][1]
        owner, pname = owner_and_name(cm, rec0.weight)
        if hasattr(owner, pname + _KEPT):
            continue
        original = owner._parameters[pname]
        owner.register_buffer(pname + _KEPT, original.data, persistent=False)
        for _, rec in recs:
            kind = kind_named(rec.kind)
            probe = torch.fx.Graph().placeholder("site")
            set_record(probe, rec)
            merged = kind.merged_weight(cm, probe)
            owner._parameters[pname] = torch.nn.Parameter(merged, requires_grad=False)


def merge_and_unload(cm, names: Optional[Sequence[str]] = None) -> torch.fx.GraphModule:
    """A plain GraphModule with adapters ``names`` (default: the active ones) merged into its
    weights and no adapters (``CompiledModel.merge_and_unload`` gives it the source model's
    state-dict keys); this model is left as it was."""
    st = _state(cm, create=True)
    names = list(st.active) if names is None else ([names] if isinstance(names, str) else list(names))
    previous = list(st.active)
    was_merged = cm.merged
    cm.unmerge()
    try:
        merge(cm, names)
        src = cm.graph_module
        graph = copy.deepcopy(src.graph)
        for node in graph.nodes:
            recs = node_records(node) if node.op == "call_function" else {}
            for key in ("LoraRecord", "MergedFrom", "ActiveAdapters"):
                recs.pop(key, None)
        gm = torch.fx.GraphModule(src, graph, class_name=type(src).__name__)
        gm.meta.update(copy.deepcopy(src.meta))
        set_training_mode(gm, False)
        gm.graph.lint()
        gm.recompile()
    finally:
        cm.unmerge()
        if st.active != previous:  # as it was
            st.active = previous
            _apply(cm, st)
            _set_trainable(cm, st)
        if was_merged:
            merge(cm, previous)
    return gm


# -- saving and loading ------------------------------------------------------------------------------

def save_adapters(cm, directory: str, *, selected_adapters: Optional[Sequence[str]] = None, overwrite: bool = True,
                  tensors=None) -> None:
    """PEFT's multi-adapter layout: "default" in ``directory``, every other adapter in
    ``directory/<name>/``, each written atomically (``lorafx.adapter_io``)."""
    st = _state(cm)
    names = _names(st) if selected_adapters is None else list(selected_adapters)
    for n in names:
        if n not in _names(st):
            raise KeyError(f"save: this model has no adapter named {n!r}; its adapters: {_names(st)}")
    if st is None:
        _save_one(cm, directory, overwrite=overwrite, tensors=tensors)
        return
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"{directory} is a file: pass a folder to save the adapters in")
    for n in names:
        where = directory if n == DEFAULT else os.path.join(directory, n)
        _save_one(cm, where, overwrite=overwrite, tensors=tensors, records=st.records[n])


def load_adapter(cm, directory: str, adapter_name: str, *, trust_pickle: bool = False) -> None:
    """Load the adapter in ``directory`` (PEFT's or lorafx's) as adapter ``adapter_name``:
    into it if it exists (same sites, shapes and scales), else as a new adapter created
    with the saved configuration (not active, as PEFT's ``load_adapter``)."""
    files = read_adapter_files(directory, trust_pickle)
    if files.shortcuts:
        raise ValueError(f"{directory} holds shortcut adapters, which are not named adapters; load it with "
                         "lorafx.load_adapter(model, folder)")
    if files.sparse:
        raise ValueError(f"{directory} holds sparse adapters (sparsity=...); load it with "
                         "lorafx.load_adapter(pruned_model, folder)")
    st = _state(cm)
    created = adapter_name not in _names(st)
    if created:
        settings = compile_settings(files.config)
        other = {k: v for k, v in settings.items() if k not in ADD_OPTIONS and v not in (None, False, (), [], {})}
        if other:
            raise ValueError(f"{directory}: the adapter uses {other}, which a named adapter (add_adapter) does not "
                             "support yet; load it with lorafx.load_adapter(model, folder) into its own model")
        add_adapter(cm, adapter_name, **{k: v for k, v in settings.items() if k in ADD_OPTIONS})
    try:
        copy_adapter_weights(cm, directory, files.tensors, files.config, records=adapter_records(cm, adapter_name))
    except BaseException:
        if created:
            delete_adapter(cm, adapter_name)
        raise
