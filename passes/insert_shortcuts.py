"""InsertShortcuts: LoRA-adapted shortcut connections (HeteroLoRA, arXiv 2406.14956).

Requires: a captured graph (runs after InsertLoRA in the default pipeline; it also runs
without it).  Provides: ``"shortcuts"`` and ``"lora"`` (the graph holds adapter ops, so the
passes that work on them, MergeLoRA included, apply).  Invalidates: ``"cost"``.
Preserves: outputs and gradients w.r.t. the inputs exactly while B = 0 (the init);
afterwards only the adapters (lora_A, lora_B of every adapter) are trainable.

HeteroLoRA adds, per transformer layer, low-rank maps between points of the residual
stream: each is ``dst + s·(src Aᵀ) Bᵀ``, i.e. a frozen identity plus s·BA when
src is dst's own skip.  The sites are found from the graph's structure only
(``find_shortcut_sites``), never from module names:

* a *residual add* is an ``aten.add.Tensor`` of two float tensors shaped like its
  output, one of which (the skip) is an ancestor of the other (the branch), with a
  matrix product (linear, addmm, mm, matmul, bmm or a lorafx adapter op) on the way
  from skip to branch.  That leaves out rotary embeddings, GELU's inner add, masks and
  position embeddings;
* a residual add is an *attention add* when its branch holds attention (SDPA, a
  softmax or a product of two activations), else an *FFN add*.  In graph order an
  attention add starts a layer and the next FFN add closes it;
* per layer i (h_i its input = the attention add's skip, a_i the FFN add's skip):

  ==================  ==========================  ==========================
  link                src                         dst
  ==================  ==========================  ==========================
  attn_skip           h_i                         layer i's attention add
  ffn_skip            a_i                         layer i's FFN add
  input_to_ffn        h_i                         layer i's FFN add
  prev_ffn_to_attn    a_{i-1} (i >= 1)            layer i's attention add
  ==================  ==========================  ==========================

  so a model with L attention+FFN layers has 4L - 1 sites, named
  ``shortcuts.<i>.<link>``.  A layer with only one kind of add (``ResidualBlock``'s
  FFN-only blocks) gets that add's skip link.  In a post-norm model (BERT) the skip is
  the previous LayerNorm's output and the adds are the ones before each LayerNorm.

Each site becomes ``lora_shortcut(src, dst, A, B, scale)`` right after dst, taking over
dst's users; sites sharing a dst chain (the second reads the first's output), and a
src that is itself an adapted dst is read after its adapters, as the graph's own users
read it.  A (r, dim) is kaiming-uniform from the compile's seed, B (dim, r) is 0;
both live under the graph module's ``lorafx_shortcuts`` submodule
(``lorafx_shortcuts.layer3_attn_skip.lora_A``).

Before::

    %add_1 = call_function[target=aten.add.Tensor](args=(%add, %linear_6))      # FFN add of layer 0
    %rms = ...(args=(%add_1, ...))

After::

    %add_1 = call_function[target=aten.add.Tensor](args=(%add, %linear_6))
    %A = get_attr[target=lorafx_shortcuts.layer0_ffn_skip.lora_A]
    %B = get_attr[target=lorafx_shortcuts.layer0_ffn_skip.lora_B]
    %shortcuts_0_ffn_skip = call_function[target=lorafx.lora_shortcut.default](
        args=(%add, %add_1, %A, %B, 2.0))        # meta: shortcut(ffn_skip, r=8, scale=2)
    %rms = ...(args=(%shortcuts_0_ffn_skip, ...))

Options: ``shortcuts`` (switches the pass on), ``shortcut_r`` (the rank of every site),
``shortcut_alpha`` (scale = alpha / r), ``shortcut_pattern`` ({site: rank}: exactly these
sites, rank 0 for none; ``lorafx.load_adapter`` rebuilds a saved set with it).  When an
allocation pass (AllocateRanks) has set ``graph_record(gm).allocation``, the sites and
ranks come from it and ``shortcut_r`` is ignored.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.fx

from lorafx import options as O
from lorafx.context import CompileContext
from lorafx.dialect import SHORTCUT, ShortcutRecord, kind_of
from lorafx.dialect.shortcut import LINKS
from lorafx.graph_utils import set_parameter
from lorafx.meta import DeferredInit, graph_record
from lorafx.options import Option
from lorafx.pipeline import CAPTURED, Pass, PassResult, provided

from .insert_lora import draw_A, freeze_base

__all__ = ["InsertShortcuts", "ShortcutSite", "find_shortcut_sites", "SUBMODULE"]

SUBMODULE = "lorafx_shortcuts"  # the graph module's submodule holding every shortcut's A and B
_NO_RESIDUALS = ("the graph has no residual connections (no add of a tensor and a function of it through a "
                 "linear layer), so there is nowhere to put shortcut adapters; drop shortcuts=True")

aten = torch.ops.aten
_MATMUL = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default, aten.bmm.default,
           aten.baddbmm.default}
_PRODUCTS = {aten.matmul.default, aten.bmm.default, aten.baddbmm.default, aten.mm.default}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
_SDPA = {aten.scaled_dot_product_attention.default, aten._scaled_dot_product_flash_attention_for_cpu.default,
         aten._scaled_dot_product_efficient_attention.default, aten._scaled_dot_product_flash_attention.default}


@dataclass(frozen=True)
class ShortcutSite:
    name: str  # stable across captures of the same model: "shortcuts.<layer>.<link>"
    link: str  # "attn_skip" | "ffn_skip" | "input_to_ffn" | "prev_ffn_to_attn"
    src: torch.fx.Node  # the hidden state the adapter reads
    dst: torch.fx.Node  # the residual add whose output the adapter's output is added to
    dim: int  # hidden size (src and dst last dim)


# -- finding the sites --------------------------------------------------------------------------

def _val(node) -> Optional[torch.Tensor]:
    v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _is_product(node: torch.fx.Node) -> bool:
    """A matrix product: a linear-like aten op, or a lorafx adapter op."""
    if node.op != "call_function":
        return False
    return node.target in _MATMUL or kind_of(node) is not None


def _ancestors(node: torch.fx.Node) -> Set[torch.fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _between(skip: torch.fx.Node, branch: torch.fx.Node, above_branch: Set[torch.fx.Node]) -> Set[torch.fx.Node]:
    """The nodes on a path from ``skip`` to ``branch`` (both included), given branch's ancestors."""
    seen, stack = set(), [skip]
    while stack:
        n = stack.pop()
        if n not in seen and n in above_branch:
            seen.add(n)
            stack.extend(n.users)
    return seen


def _is_parameter(node) -> bool:
    """Whether ``node`` is a stored tensor, possibly through single-input views (t, permute, ...)."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and len(node.all_input_nodes) == 1:
        node = node.all_input_nodes[0]
    return isinstance(node, torch.fx.Node) and node.op == "get_attr"


def _is_attention(node: torch.fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target in _SDPA or node.target in _SOFTMAX:
        return True
    if node.target in _PRODUCTS:
        operands = node.args[1:3] if node.target is aten.baddbmm.default else node.args[:2]
        return all(isinstance(a, torch.fx.Node) and not _is_parameter(a) for a in operands)
    return False


@dataclass
class _Add:
    node: torch.fx.Node
    skip: torch.fx.Node
    attention: bool


def _residual_add(node: torch.fx.Node) -> Optional[_Add]:
    """The residual add ``node`` is (skip operand, whether its branch holds attention), or None."""
    if node.op != "call_function" or node.target is not aten.add.Tensor or len(node.args) < 2:
        return None
    a, b = node.args[0], node.args[1]
    out = _val(node)
    if out is None or not out.is_floating_point() or node.kwargs.get("alpha", 1) != 1:
        return None
    if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
        return None
    va, vb = _val(a), _val(b)
    if va is None or vb is None or tuple(va.shape) != tuple(out.shape) or tuple(vb.shape) != tuple(out.shape):
        return None
    for skip, branch in ((a, b), (b, a)):
        above = _ancestors(branch)
        if skip in above:
            path = _between(skip, branch, above)
            if any(_is_product(n) for n in path):
                return _Add(node, skip, any(_is_attention(n) for n in path))
            return None
    return None


def find_shortcut_sites(gm: torch.fx.GraphModule) -> List[ShortcutSite]:
    """Every HeteroLoRA shortcut site of ``gm``, in graph order of their dst (see the
    module docstring for the links).  Empty for a graph without residual adds."""
    adds = [r for r in map(_residual_add, gm.graph.nodes) if r is not None]
    layers: List[Dict[str, _Add]] = []
    for add in adds:  # an attention add opens a layer; an FFN add closes the open one
        key = "attn" if add.attention else "ffn"
        if not layers or key in layers[-1] or (key == "attn" and "ffn" in layers[-1]):
            layers.append({})
        layers[-1][key] = add
    sites: List[ShortcutSite] = []

    def site(i, link, src, dst):
        sites.append(ShortcutSite(f"shortcuts.{i}.{link}", link, src, dst.node, int(_val(dst.node).shape[-1])))

    for i, layer in enumerate(layers):
        attn, ffn = layer.get("attn"), layer.get("ffn")
        before = layers[i - 1].get("ffn") if i > 0 else None
        if attn is not None:
            site(i, "attn_skip", attn.skip, attn)
            if before is not None:
                site(i, "prev_ffn_to_attn", before.skip, attn)
        if ffn is not None:
            site(i, "ffn_skip", ffn.skip, ffn)
            if attn is not None:
                site(i, "input_to_ffn", attn.skip, ffn)
    order = {n: k for k, n in enumerate(gm.graph.nodes)}
    return sorted(sites, key=lambda s: (order[s.dst], LINKS.index(s.link)))


# -- options -----------------------------------------------------------------------------------

def _check_pattern(name, value, where=""):
    if not isinstance(value, Mapping):
        raise TypeError(f"{where}{name} must be a dict {{site name: rank}}, got {value!r}; pass e.g. "
                        f"{name}={{'shortcuts.0.attn_skip': 8}}")
    for site, rank in value.items():
        if not isinstance(site, str):
            raise TypeError(f"{where}{name} keys must be site names such as 'shortcuts.0.attn_skip', got {site!r}")
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 0:
            raise ValueError(f"{where}{name}[{site!r}] must be a rank >= 0 (0: no adapter there), got {rank!r}")


def _check_alpha(name, value, where=""):
    O.check_positive_real(name, value, where, ": the shortcut adapters are scaled by alpha / r")


@dataclass(frozen=True)
class InsertShortcuts(Pass):
    shortcut_r: int = 8
    shortcut_alpha: float = 16.0
    shortcut_pattern: Dict[str, int] = field(default_factory=dict)
    seed: Optional[int] = None
    freeze: bool = True  # freeze the base first when no adapter pass ran before (InsertLoRA does it otherwise)

    requires = frozenset({CAPTURED})
    provides = frozenset({"shortcuts", "lora"})
    invalidates = frozenset({"cost"})
    options = (
        Option("shortcuts", bool, False, "add LoRA-adapted shortcut connections between points of the residual "
               "stream (HeteroLoRA)", enables=True),
        Option("shortcut_r", int, 8, "rank of every shortcut adapter (unless shortcut_pattern or an allocation "
               "gives the ranks)", check=O.check_positive_int),
        Option("shortcut_alpha", float, 16.0, "shortcut alpha; scale = shortcut_alpha / rank", check=_check_alpha),
        Option("shortcut_pattern", dict, {}, "{site name: rank} of exactly the shortcut sites to adapt (0: none), "
               "e.g. {'shortcuts.0.attn_skip': 8}", check=_check_pattern),
    )

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "shortcut_r", int(self.shortcut_r))
        object.__setattr__(self, "shortcut_alpha", float(self.shortcut_alpha))
        object.__setattr__(self, "shortcut_pattern", {k: int(v) for k, v in self.shortcut_pattern.items()})

    def validate(self) -> None:
        where = "InsertShortcuts: "
        O.check_positive_int("shortcut_r", self.shortcut_r, where)
        _check_alpha("shortcut_alpha", self.shortcut_alpha, where)
        _check_pattern("shortcut_pattern", self.shortcut_pattern, where)
        O.check_seed("seed", self.seed, where)
        O.check_bool("freeze", self.freeze, where)

    def ranks(self, gm: torch.fx.GraphModule, sites: List[ShortcutSite]) -> Dict[str, int]:
        """{site name: rank} for the sites that get an adapter."""
        names = [s.name for s in sites]
        allocation = graph_record(gm).allocation
        if self.shortcut_pattern and allocation is not None:
            raise ValueError("InsertShortcuts: shortcut_pattern and the allocation of AllocateRanks (rank_budget) "
                             "both choose the shortcut sites; pass only one of them")
        chosen = self.shortcut_pattern if self.shortcut_pattern else None
        if chosen is None and allocation is not None:
            chosen = {k: v for k, v in allocation.items() if k.startswith("shortcuts.")}
        if chosen is None:
            return {n: self.shortcut_r for n in names}
        unknown = sorted(set(chosen) - set(names))
        if unknown:
            source = "shortcut_pattern" if self.shortcut_pattern else "the allocation"
            raise ValueError(f"InsertShortcuts: {source} names unknown shortcut site(s) {unknown[:5]}; "
                             f"this model's sites: {', '.join(names)}")
        return {n: int(chosen[n]) for n in names if chosen.get(n, 0) > 0}

    def run(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
        sites = find_shortcut_sites(gm)
        if not sites:
            raise ValueError(f"InsertShortcuts: {_NO_RESIDUALS}")
        ranks = self.ranks(gm, sites)
        seed = self.seed if self.seed is not None else ctx.decide("seed", ctx.draw_seed)  # replayed per capture
        gen = torch.Generator().manual_seed(seed)
        if self.freeze and "lora" not in provided(gm):
            freeze_base(gm)
        current: Dict[torch.fx.Node, torch.fx.Node] = {}  # an adapted dst -> the node its users now read
        made = []
        deferred: List[Tuple[str, Tuple[int, ...], str, int]] = []
        for s in sites:
            r = ranks.get(s.name, 0)
            if r <= 0:
                continue
            ref = _reference_tensor(s.dst)
            a_path, b_path = _paths(s.name)
            A = torch.empty(r, s.dim, dtype=ref.dtype, device=ref.device)
            if A.is_meta:  # drawn by lorafx.materialize once the weights exist
                deferred.append((a_path, tuple(A.shape), "kaiming", r))
            else:
                A.copy_(draw_A(A.shape, "kaiming", r, gen))
            set_parameter(gm, a_path, torch.nn.Parameter(A))
            set_parameter(gm, b_path, torch.nn.Parameter(torch.zeros(s.dim, r, dtype=ref.dtype, device=ref.device)))
            alpha = self.shortcut_alpha
            record = ShortcutRecord(site=s.name, link=s.link, src=s.src.name, dst=s.dst.name, lora_A=a_path,
                                    lora_B=b_path, r=r, alpha=alpha, scale=alpha / r, dim=s.dim)
            y = current.get(s.dst, s.dst)
            src = current.get(s.src, s.src)
            with gm.graph.inserting_before(y.next):
                new = SHORTCUT.build(gm.graph, src, y, record, created_by=self.name, name=s.name.replace(".", "_"))
            for key in ("nn_module_stack", "stack_trace", "val"):
                if key in s.dst.meta:
                    new.meta[key] = s.dst.meta[key]
            y.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
            current[s.dst] = new
            made.append(s)
        if deferred:
            graph_record(gm).deferred_init += (DeferredInit(seed, tuple(deferred)),)
        trainable = sum(p.numel() for p in gm.parameters() if p.requires_grad)
        info = {
            "shortcut_sites": len(made),
            "candidate_sites": len(sites),
            "shortcut_params": sum(2 * ranks[s.name] * s.dim for s in made),
            "trainable_params": trainable,
            "sites": {s.name: ranks[s.name] for s in made},
        }
        return PassResult(gm, bool(made), info)

    def summary(self, info) -> List[str]:
        links = {}
        for name in info.get("sites", {}):
            link = name.rsplit(".", 1)[-1]
            links[link] = links.get(link, 0) + 1
        shown = ", ".join(f"{k}={v}" for k, v in links.items()) or "none"
        return [f"shortcut_sites={info.get('shortcut_sites', 0)}/{info.get('candidate_sites', 0)} ({shown}), "
                f"shortcut_params={info.get('shortcut_params', 0)}"]


def _paths(site: str) -> Tuple[str, str]:
    """Attribute paths of a site's A and B: shortcuts.3.attn_skip -> lorafx_shortcuts.layer3_attn_skip.lora_A."""
    _, layer, link = site.split(".", 2)
    base = f"{SUBMODULE}.layer{layer}_{link}"
    return f"{base}.lora_A", f"{base}.lora_B"


def _reference_tensor(node: torch.fx.Node) -> torch.Tensor:
    """An empty tensor with the dtype and device the adapter gets: the residual's."""
    v = _val(node)
    return torch.empty(0, dtype=v.dtype, device=v.device)

