"""Zero-cost proxies: how much an adapter at each candidate site is worth (HeteroLoRA).

``score_sites(gm, ctx, sites, proxy)`` scores every candidate adapter site of a captured
graph -- an adaptable linear, or a shortcut site of ``InsertShortcuts`` -- on a few
calibration batches, and returns ``{site name: score}``.  ``AllocateRanks`` turns the
scores into ranks.  This module is not a pass: it reads the graph and changes nothing.

**What is scored, and why.**  HeteroLoRA (arXiv 2406.14956) scores the LoRA parameters
themselves.  At initialisation B = 0, so ∂L/∂A = 0 and SynFlow's product through B·A is
0: grad-norm, SNIP and SynFlow on a fresh adapter are degenerate.  lorafx scores each
site through the gradient of the site's *frozen* map instead, the virtual weight gradient

    G = ∂L/∂W = Σ_tokens dYᵀ X                       (out × in)

which is exactly what the adapter sees first: LoRA's first step moves B by -lr·s·G·Aᵀ.
It costs one forward and backward of the frozen model per batch, and no warm-up
training.  A shortcut site has no frozen map of its own; it is scored through a zero
d × d probe Z added at its destination (``dst + src·Zᵀ``), whose gradient is dYᵀ·src, and
its "frozen map" W is taken to be the identity (a residual skip carries I·h).

The proxies, averaged over the calibration batches b (G_b the batch's virtual gradient;
the NAS definitions of Abdelfattah et al., arXiv 2101.08134, applied to the frozen map):

* ``grad_norm``: ‖G_b‖_F
* ``snip``: Σ |W ⊙ G_b|  (connection sensitivity, Lee et al. 2019)
* ``fisher``: ½ Σ_j (Σ_i W_ji G_b,ji)² = ½ Σ_j (Σ_tokens Y_j dY_j)²  (per output channel,
  Theis et al. 2018)
* ``synflow``: Σ |W ⊙ ∂R/∂W| with every parameter replaced by its absolute value, every
  float input by ones and R the sum of the logits (Tanaka et al. 2020); data-free but for
  the token ids of the first batch, which an embedding needs.
* ``random``: a seeded uniform draw per site; ``constant``: 1 everywhere (baselines).

Nothing is left behind: the graph is run as a private copy that shares the frozen
weights read-only (buffers the graph may write are cloned), gradients come from
``torch.autograd.grad`` (no ``.grad``), no hook is registered, and the random state of
the caller is restored.

The loss: the graph's own ``loss`` output when it has one (captured with ``labels``).
A causal LM captured without labels gets the shifted next-token loss on its logits, with
the batch's ``labels`` or, without them, its ``input_ids``.  Any other model needs
``score_loss=lambda outputs, batch: ...``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.fx
import torch.nn.functional as F

from lorafx.capture import check_input_ranks
from lorafx.context import CompileContext
from lorafx.graph_utils import get_attr, owner_and_name
from lorafx.meta import graph_record

__all__ = ["PROXIES", "GRADIENT_PROXIES", "Candidate", "score_sites", "loss_of", "mean_weight_gradients",
           "private_copy", "split_labels", "numbered_batches"]

GRADIENT_PROXIES = ("grad_norm", "snip", "fisher")
PROXIES = GRADIENT_PROXIES + ("synflow", "random", "constant")
aten = torch.ops.aten


@dataclass(frozen=True)
class Candidate:
    """A site an adapter may go to.  ``kind``: "linear" (``weights``: the attribute paths of
    its frozen weight, with ``transposed`` for GPT-2's (in, out) Conv1D) or "shortcut"
    (``src``/``dst``: node names of the hidden state read and the residual add written)."""

    name: str
    kind: str
    in_features: int
    out_features: int
    weight: Optional[str] = None
    transposed: bool = False
    src: Optional[str] = None
    dst: Optional[str] = None

    @property
    def params_per_rank(self) -> int:
        return self.in_features + self.out_features

    @property
    def max_rank(self) -> int:
        return min(self.in_features, self.out_features)


# -- running the graph on calibration data ------------------------------------------------------

def private_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule running a copy of ``gm``'s graph on new module objects that share its
    parameters (read-only here) and clones of its buffers (a graph may write its buffers)."""
    graph = copy.deepcopy(gm.graph)
    sg = torch.fx.GraphModule(gm, graph, class_name="LoraFxScoring")
    for name, buf in list(sg.named_buffers()):
        owner, attr = owner_and_name(sg, name)
        owner._buffers[attr] = buf.clone()
    return sg


def split_labels(gm: torch.fx.GraphModule, kwargs: Dict[str, Any], index: int) -> Tuple[Dict[str, Any], Any]:
    """(the inputs the graph takes, the labels it does not take), checked against the capture."""
    rec = graph_record(gm)
    taken = set(rec.inputs)
    labels = None
    if "labels" in kwargs and "labels" not in taken:
        kwargs = dict(kwargs)
        labels = kwargs.pop("labels")
    extra = sorted(k for k in kwargs if k not in taken and kwargs[k] is not None)
    if extra:
        raise ValueError(
            f"calibration batch {index} has input(s) {extra} that the model was not captured with "
            f"(captured inputs: {sorted(taken)}); give calibration batches with the example inputs' keys, "
            f"e.g. {{{', '.join(repr(k) + ': ...' for k in sorted(taken))}}}")
    missing = sorted(k for k in taken if k not in kwargs)
    if missing and "labels" in missing and rec.causal_lm and "input_ids" in kwargs:
        kwargs = {**kwargs, "labels": kwargs["input_ids"]}  # a causal LM's labels are its inputs
        missing.remove("labels")
    if missing:
        raise ValueError(f"calibration batch {index} lacks input(s) {missing} the model was captured with; "
                         f"give every batch the keys {sorted(taken)}")
    try:
        check_input_ranks(gm, kwargs)
    except ValueError as e:
        raise ValueError(f"calibration batch {index}: {e}") from None
    return kwargs, labels


def _field(out: Any, name: str) -> Any:
    if isinstance(out, Mapping):
        return out.get(name)
    return getattr(out, name, None)


def loss_of(out: Any, kwargs: Dict[str, Any], labels: Any, causal_lm: bool,
            score_loss: Optional[Callable[[Any, Dict[str, Any]], torch.Tensor]] = None) -> torch.Tensor:
    """The scalar loss scoring differentiates (see the module docstring)."""
    if score_loss is not None:
        batch = dict(kwargs) if labels is None else {**kwargs, "labels": labels}
        loss = score_loss(out, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"score_loss must return a scalar tensor, got {type(loss).__name__}")
        return loss.reshape(())
    loss = _field(out, "loss")
    if isinstance(loss, torch.Tensor):
        return loss
    logits = _field(out, "logits")
    if causal_lm and isinstance(logits, torch.Tensor) and logits.dim() == 3:
        target = labels if labels is not None else kwargs.get("input_ids")
        if isinstance(target, torch.Tensor) and target.shape == logits.shape[:2]:
            return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target[:, 1:].flatten(),
                                   ignore_index=-100)
    raise ValueError(
        "scoring adapter sites needs a loss, and this model's output has none: capture it with labels "
        "(example_kwargs={'input_ids': ids, 'labels': labels}), or pass score_loss=lambda outputs, batch: ... "
        "(a scalar tensor), or use a proxy that needs no loss (proxy='synflow', 'random' or 'constant')")


def numbered_batches(ctx: CompileContext, limit: Optional[int] = None):
    """``(index, args, kwargs)`` for the calibration batches (``ctx.batches()``), at most ``limit``."""
    for i, (args, kwargs) in enumerate(ctx.batches()):
        if limit is not None and i >= limit:
            return
        yield i, args, kwargs


# -- probes ---------------------------------------------------------------------------------------

def _add_shortcut_probes(sg: torch.fx.GraphModule, sites: Sequence[Candidate], like: torch.Tensor) -> Dict[str, str]:
    """Add ``dst + reshape_as(linear(src, Z), dst)`` with a zero d × d parameter Z for every
    shortcut site (src may have other leading dims than dst: OPT's FFN runs on token rows);
    returns {site name: Z's attribute path}."""
    nodes = {n.name: n for n in sg.graph.nodes}
    probes = {}
    for i, site in enumerate(s for s in sites if s.kind == "shortcut"):
        path = f"_lorafx_probe_{i}"
        sg.register_parameter(path, torch.nn.Parameter(
            torch.zeros(site.out_features, site.in_features, dtype=like.dtype, device=like.device)))
        src, dst = nodes[site.src], nodes[site.dst]
        with sg.graph.inserting_after(dst):
            z = sg.graph.get_attr(path)
        with sg.graph.inserting_after(z):
            lin = sg.graph.call_function(aten.linear.default, (src, z))
        with sg.graph.inserting_after(lin):
            shaped = sg.graph.call_function(aten.reshape_as.default, (lin, dst))
        with sg.graph.inserting_after(shaped):
            out = sg.graph.call_function(aten.add.Tensor, (dst, shaped))
        dst.replace_all_uses_with(out, delete_user_cb=lambda user: user not in (out, shaped))
        probes[site.name] = path
    sg.recompile()
    return probes


def _leaves(sg: torch.fx.GraphModule, sites: Sequence[Candidate], probes: Dict[str, str]) -> Dict[str, torch.Tensor]:
    """{key: the tensor whose gradient scores a site}: each linear's weight (by its path),
    rebound on ``sg`` as a leaf that requires grad and shares the weight's storage, and
    each shortcut's probe (by the site's name)."""
    out = {}
    for site in sites:
        if site.kind == "linear" and site.weight not in out:
            leaf = get_attr(sg, site.weight).detach().requires_grad_(True)
            owner, attr = owner_and_name(sg, site.weight)
            (owner._parameters if attr in owner._parameters else owner._buffers)[attr] = leaf
            out[site.weight] = leaf
    for name, path in probes.items():
        out[name] = get_attr(sg, path)
    return out


def _key(site: Candidate) -> str:
    return site.weight if site.kind == "linear" else site.name


def _frozen_map(site: Candidate, sg: torch.fx.GraphModule) -> Optional[torch.Tensor]:
    """W of a linear site (stored layout); None (the identity) for a shortcut."""
    return get_attr(sg, site.weight).detach() if site.kind == "linear" else None


def _proxy_value(proxy: str, W: Optional[torch.Tensor], G: torch.Tensor, transposed: bool) -> float:
    G = G.detach().double()
    if proxy == "grad_norm":
        return float(G.norm())
    if W is None:  # a shortcut: W = I
        diag = torch.diagonal(G)
        return float(diag.abs().sum()) if proxy in ("snip", "synflow") else float(0.5 * (diag ** 2).sum())
    Wg = W.double() * G
    if proxy in ("snip", "synflow"):
        return float(Wg.abs().sum())
    rows = Wg.sum(dim=0 if transposed else 1)  # per output channel: Σ_i W_ji G_ji
    return float(0.5 * (rows ** 2).sum())


# -- scoring ----------------------------------------------------------------------------------------

def score_sites(gm: torch.fx.GraphModule, ctx: CompileContext, sites: Sequence[Candidate], proxy: str, *,
                seed: int = 0, max_batches: int = 4,
                score_loss: Optional[Callable[[Any, Dict[str, Any]], torch.Tensor]] = None) -> Dict[str, float]:
    """{site name: score} for every candidate (see the module docstring for each proxy)."""
    if proxy not in PROXIES:
        raise ValueError(f"unknown proxy {proxy!r}; choose one of {PROXIES}")
    if proxy == "constant":
        return {s.name: 1.0 for s in sites}
    if proxy == "random":
        gen = torch.Generator().manual_seed(seed)
        draws = torch.rand(len(sites), generator=gen, dtype=torch.float64)
        return {s.name: float(v) for s, v in zip(sites, draws)}
    meta = next((s.weight for s in sites if s.kind == "linear" and get_attr(gm, s.weight).is_meta), None)
    if meta is not None:
        raise ValueError(f"proxy={proxy!r} runs the model, but its weights are on the meta device ({meta}): "
                         "plan without weights with proxy='random' or 'constant', or load the weights first")
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        if proxy == "synflow":
            return _synflow(gm, ctx, sites)
        return _gradient_scores(gm, ctx, sites, proxy, max_batches, score_loss)


def _virtual_gradients(gm, ctx, sites, max_batches, score_loss):
    """Yields ``(sg, {key: G_b})`` for each calibration batch: the private graph copy and the
    virtual gradient of every site (by ``_key``) on that batch."""
    sg = private_copy(gm)
    like = next((p for p in gm.parameters() if p.is_floating_point()), torch.zeros(()))
    leaves = _leaves(sg, sites, _add_shortcut_probes(sg, sites, like))
    keys = list(leaves)
    count = 0
    causal = graph_record(gm).causal_lm
    for i, args, kwargs in numbered_batches(ctx, max_batches):
        kwargs, labels = split_labels(gm, kwargs, i)
        out = sg(*args, **kwargs)
        loss = loss_of(out, kwargs, labels, causal, score_loss)
        if not torch.isfinite(loss):
            raise ValueError(f"the loss of calibration batch {i} is {float(loss)}: scores would be meaningless; "
                             "check the batch (labels in range, no empty answer)")
        yield sg, dict(zip(keys, torch.autograd.grad(loss, [leaves[k] for k in keys], allow_unused=True)))
        count += 1
    if count == 0:
        raise ValueError("calibration= yielded no batch: give at least one batch, or leave calibration out "
                         "to score on the example inputs")


def _gradient_scores(gm, ctx, sites, proxy, max_batches, score_loss) -> Dict[str, float]:
    totals = {s.name: 0.0 for s in sites}
    count = 0
    for sg, grads in _virtual_gradients(gm, ctx, sites, max_batches, score_loss):
        for site in sites:
            G = grads[_key(site)]
            if G is not None:
                totals[site.name] += _proxy_value(proxy, _frozen_map(site, sg), G, site.transposed)
        count += 1
    return {name: total / count for name, total in totals.items()}


def mean_weight_gradients(gm: torch.fx.GraphModule, ctx: CompileContext, sites: Sequence[Candidate], *,
                          seed: int = 0, max_batches: int = 8,
                          score_loss: Optional[Callable[[Any, Dict[str, Any]], torch.Tensor]] = None
                          ) -> Dict[str, torch.Tensor]:
    """{site name: the mean over calibration batches of ∂L/∂W} for linear candidates, in
    (out, in) layout and float64 -- the dense weight gradient of LoRS's initialisation.
    Runs like the proxies: on a private copy, leaving nothing behind."""
    if any(s.kind != "linear" for s in sites):
        raise ValueError("mean_weight_gradients takes linear sites only")
    totals: Dict[str, torch.Tensor] = {}
    count = 0
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        for _, grads in _virtual_gradients(gm, ctx, sites, max_batches, score_loss):
            for site in sites:
                G = grads[_key(site)]
                G = torch.zeros(site.out_features, site.in_features, dtype=torch.float64) if G is None else \
                    (G.t() if site.transposed else G).detach().to(torch.float64)
                totals[site.name] = totals[site.name] + G if site.name in totals else G
            count += 1
    return {name: total / count for name, total in totals.items()}


def _synflow(gm, ctx, sites) -> Dict[str, float]:
    sg = private_copy(gm)
    for name, p in list(sg.named_parameters()):
        if p.is_floating_point():
            owner, attr = owner_and_name(sg, name)
            owner._parameters[attr] = torch.nn.Parameter(p.detach().abs(), requires_grad=False)
    like = next((p for p in sg.parameters() if p.is_floating_point()), torch.zeros(()))
    leaves = _leaves(sg, sites, _add_shortcut_probes(sg, sites, like))
    _, args, kwargs = next(numbered_batches(ctx, 1), (0, (), {}))
    kwargs, _ = split_labels(gm, kwargs, 0)
    kwargs = {k: (torch.ones_like(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in kwargs.items()}
    args = tuple(torch.ones_like(a) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    out = sg(*args, **kwargs)
    logits = _field(out, "logits")
    if isinstance(out, torch.Tensor):
        logits = out
    if not isinstance(logits, torch.Tensor):
        floats = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not floats:
            raise ValueError("synflow needs a float output to sum; this model returns none")
        logits = sum(t.sum() for t in floats)
    R = logits.double().sum()
    if not torch.isfinite(R):
        raise ValueError("synflow overflowed on this model (the product of |W| through its layers is not finite); "
                         "use proxy='snip' or 'grad_norm'")
    keys = list(leaves)
    grads = dict(zip(keys, torch.autograd.grad(R, [leaves[k] for k in keys], allow_unused=True)))
    scores = {}
    for site in sites:
        G = grads[_key(site)]
        scores[site.name] = 0.0 if G is None else _proxy_value("synflow", _frozen_map(site, sg), G, site.transposed)
    return scores
