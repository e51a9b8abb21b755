"""The custom-model table: what PEFT's LoRA users adapt, row by row, against PEFT itself.

Modelled on PEFT's custom-model test table: each row is ``(id, fixture model, options,
capabilities)`` where the options are LoraConfig fields, passed to ``lorafx.compile`` by
PEFT's names as a user would pass a LoraConfig's fields, and to ``peft.LoraConfig``
unchanged.  The fixture models are in tests/custom_models.py.  ``test_row`` runs every check
on each row, in this order, on one compiled model (``CHECKS``; a failure names the check):

* compile: lorafx adapts what PEFT adapts -- the PEFT state-dict keys of lorafx's trainable
  tensors are PEFT's keys, with PEFT's shapes, and nothing else trains;
* identity at init (outputs equal the base model's), or PEFT's documented init where it is
  not the identity (``init_lora_weights=False``: the adapter changes the outputs; the parity
  check compares with PEFT);
* training: after a few optimizer steps only the adapters (and ``modules_to_save``, trainable
  tokens) changed, and the user's model is untouched;
* merge, unmerge and merge_and_unload compute what the unmerged model computes;
* parity: with the tensors of a PeftModel built from the same LoraConfig copied in (by PEFT
  state-dict key), outputs and the gradients of every adapter tensor equal PEFT's;
* ``cm.save_adapter`` -> ``PeftModel.from_pretrained`` gives the same outputs (after training
  steps, so the adapter is not trivial);
* a PEFT-saved adapter -> ``lorafx.load_adapter`` gives the same outputs.

Each row names the capabilities it needs (``requires``).  ``capabilities()`` probes lorafx
for each of them once (does ``compile`` take the option, does it adapt the layer?); a row
needing one lorafx lacks is marked ``xfail(strict=True)`` at run time, so when the capability
lands its rows run for real, and a row that passes while still marked fails the run.  A new
capability is a new ``PROBES`` entry.  The heavier rows are ``slow`` (``pytest -m slow
tests/test_custom_models.py``, or ``-m ''`` for all rows).

Models are float64 so that equality is tight (merging rounds through float32), except the
PiSSA and OLoRA rows: PEFT initialises those in float32 only.
"""
from __future__ import annotations

import copy
import functools
from typing import Dict, NamedTuple, Optional, Tuple

import pytest
import torch

import lorafx
from lorafx import adapter_io
from lorafx.graph_utils import get_attr

from custom_models import MODELS, build, example_input

peft = pytest.importorskip("peft")

TOL = dict(rtol=1e-9, atol=1e-10)
INIT_TOL = dict(rtol=1e-7, atol=1e-9)  # identity at init (a base-changing init subtracts B·A from W)
MERGE_TOL = dict(rtol=1e-5, atol=1e-5)  # merging rounds through float32
PREFIX = "base_model.model."


# -- the table ---------------------------------------------------------------------------------------
class Row(NamedTuple):
    id: str
    model: str  # a name in custom_models.MODELS
    options: dict  # LoraConfig fields
    requires: Tuple[str, ...]  # capabilities (keys of PROBES)
    slow: bool = False
    dtype: torch.dtype = torch.float64


def row(id, model, options, *requires, slow=False, dtype=torch.float64):
    return Row(id, model, options, tuple(requires), slow, dtype)


def tolerances(dtype) -> Tuple[dict, dict, dict]:
    """(exact, identity at init, merged) tolerances for a model in ``dtype``."""
    if dtype == torch.float64:
        return TOL, INIT_TOL, MERGE_TOL
    loose = dict(rtol=1e-5, atol=1e-5)
    return loose, loose, loose


ROWS = [
    # linear layers; PEFT's default r=8 on lin1 (20 -> 2) exceeds min(in, out)
    row("MLP 1 LoRA", "MLP", {"target_modules": "lin0"}, "linear", slow=True),
    row("MLP 2 LoRA", "MLP", {"target_modules": ["lin0"]}, "linear", slow=True),
    row("MLP 3 LoRA", "MLP", {"target_modules": ["lin1"]}, "linear", slow=True),
    row("MLP 4 LoRA", "MLP", {"target_modules": ["lin0", "lin1"]}, "linear", slow=True),
    row("MLP 5 LoRA no bias", "MLPNoBias", {"target_modules": ["lin0", "lin1"], "r": 4, "lora_alpha": 16}, "linear",
        slow=True),
    row("MLP 6 LoRA alpha dropout", "MLP", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1},
        "linear"),
    row("MLP 7 LoRA regex", "MLP", {"target_modules": r"lin[01]", "r": 2, "lora_alpha": 3}, "linear"),
    row("MLP 8 LoRA rank and alpha pattern", "MLP",
        {"target_modules": ["lin0", "lin1"], "rank_pattern": {"lin1": 2}, "alpha_pattern": {"lin0": 32}}, "linear"),
    row("MLP 9 LoRA rslora", "MLP", {"target_modules": ["lin0", "lin1"], "r": 4, "lora_alpha": 8, "use_rslora": True},
        "linear"),
    row("MLP 10 LoRA gaussian", "MLP", {"target_modules": ["lin0", "lin1"], "init_lora_weights": "gaussian"},
        "gaussian", slow=True),
    row("MLP 11 LoRA init False", "MLP", {"target_modules": ["lin0", "lin1"], "init_lora_weights": False},
        "init_false"),
    # (PEFT initialises PiSSA and OLoRA in float32 only)
    row("MLP 12 LoRA pissa", "MLP", {"target_modules": ["lin0"], "r": 4, "init_lora_weights": "pissa"}, "pissa",
        dtype=torch.float32),
    row("MLP 13 LoRA olora", "MLP", {"target_modules": ["lin0"], "r": 4, "init_lora_weights": "olora"}, "olora",
        dtype=torch.float32, slow=True),
    row("MLP 14 LoRA lora_bias", "MLP", {"target_modules": ["lin0", "lin1"], "lora_bias": True, "lora_alpha": 32},
        "lora_bias"),
    row("MLP 15 LoRA modules_to_save", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]},
        "modules_to_save"),
    row("MLP 16 DoRA", "MLP", {"target_modules": ["lin0"], "use_dora": True}, "dora"),
    row("MLP 17 DoRA", "MLP", {"target_modules": ["lin0", "lin1"], "use_dora": True}, "dora", slow=True),
    row("MLP 18 DoRA alpha", "MLP", {"target_modules": "lin1", "use_dora": True, "lora_alpha": 32}, "dora", slow=True),
    row("MLP 19 DoRA no bias", "MLPNoBias", {"target_modules": ["lin0", "lin1"], "use_dora": True}, "dora", slow=True),
    row("MLP 20 LoRA target_parameters beside target_modules", "MLP",
        {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]}, "target_parameters", slow=True),
    # blocks under "model.layers"
    row("DeepMLP 1 LoRA exclude list", "DeepMLP",
        {"target_modules": ["lin0", "lin1"], "exclude_modules": ["model.layers.1.lin0"]}, "linear"),
    row("DeepMLP 2 LoRA exclude regex", "DeepMLP",
        {"target_modules": r".*\.lin[01]", "exclude_modules": r".*layers\.2\..*"}, "linear", slow=True),
    row("DeepMLP 3 LoRA per-layer rank pattern", "DeepMLP",
        {"target_modules": ["lin0", "lin1", "out"], "r": 2, "rank_pattern": {"layers.1.lin0": 5},
         "alpha_pattern": {"out": 1.5}}, "linear", slow=True),
    row("DeepMLP 4 LoRA layers_to_transform", "DeepMLP",
        {"target_modules": ["lin0", "lin1"], "layers_to_transform": [0, 2]}, "layers_to_transform"),
    row("DeepMLP 5 LoRA layers_to_transform int and pattern", "DeepMLP",
        {"target_modules": ["lin1"], "layers_to_transform": 1, "layers_pattern": "layers"}, "layers_to_transform",
        slow=True),
    # an embedding, transformers' Conv1D (GPT-2's (in, out) weight, 5 -> 1: r=8 above min(in, out))
    row("EmbConv1D 1 LoRA", "EmbConv1D", {"target_modules": ["conv1d"]}, "gpt2_conv1d", slow=True),
    row("EmbConv1D 2 LoRA", "EmbConv1D", {"target_modules": ["emb"]}, "embedding", slow=True),
    row("EmbConv1D 3 LoRA", "EmbConv1D", {"target_modules": ["emb", "conv1d"]}, "embedding"),
    row("EmbConv1D 4 DoRA", "EmbConv1D", {"target_modules": ["conv1d"], "use_dora": True}, "dora", slow=True),
    row("EmbConv1D 5 DoRA", "EmbConv1D", {"target_modules": ["emb"], "use_dora": True}, "embedding", "dora",
        "dora_embedding", slow=True),
    row("EmbConv1D 6 DoRA", "EmbConv1D", {"target_modules": ["emb", "conv1d"], "use_dora": True}, "embedding",
        "dora", "dora_embedding"),
    row("EmbConv1D 7 LoRA trainable tokens", "EmbConv1D",
        {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}}, "trainable_tokens"),
    row("EmbConv1D 8 LoRA lora_bias", "EmbConv1D", {"target_modules": ["conv1d"], "lora_bias": True, "lora_alpha": 32},
        "lora_bias", slow=True),
    row("EmbMLP 1 LoRA", "EmbMLP", {"target_modules": ["emb", "lin0"], "r": 4}, "embedding", slow=True),
    row("EmbMLP 2 LoRA modules_to_save", "EmbMLP", {"target_modules": ["emb"], "modules_to_save": ["lin1"]},
        "embedding", "modules_to_save"),
    row("EmbMLP 3 LoRA trainable tokens", "EmbMLP",
        {"target_modules": ["lin0", "lin1"], "trainable_token_indices": {"emb": [1, 3, 7]}}, "trainable_tokens",
        slow=True),
    # convolutions
    row("Conv1d 1 LoRA", "Conv1d", {"target_modules": ["conv1d"]}, "conv1d", slow=True),
    row("Conv1d 2 LoRA", "Conv1d", {"target_modules": ["conv1d", "lin0"], "r": 2, "lora_alpha": 5}, "conv1d"),
    row("Conv1d 3 DoRA", "Conv1d", {"target_modules": ["conv1d"], "use_dora": True}, "conv1d", "dora", "dora_conv",
        slow=True),
    row("Conv2d 1 LoRA", "Conv2d", {"target_modules": ["conv2d"]}, "conv2d", slow=True),
    row("Conv2d 2 LoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"]}, "conv2d"),
    row("Conv2d 3 LoRA rank pattern", "Conv2d",
        {"target_modules": ["conv2d", "lin0"], "rank_pattern": {"conv2d": 3}, "use_rslora": True}, "conv2d", slow=True),
    row("Conv2d 4 LoRA no bias", "Conv2dNoBias", {"target_modules": ["conv2d"]}, "conv2d", slow=True),
    row("Conv2d 5 DoRA", "Conv2d", {"target_modules": ["conv2d"], "use_dora": True}, "conv2d", "dora", "dora_conv",
        slow=True),
    row("Conv2d 6 DoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"], "use_dora": True}, "conv2d", "dora",
        "dora_conv"),
    row("Conv2d 7 LoRA lora_bias", "Conv2d", {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32},
        "conv2d", "lora_bias", "conv_lora_bias", slow=True),
    row("Conv2d Groups 1 LoRA", "Conv2dGroups", {"target_modules": ["conv2d"]}, "conv2d_groups", slow=True),
    row("Conv2d Groups 2 LoRA", "Conv2dGroups2", {"target_modules": ["conv2d"]}, "conv2d_groups"),
    row("Conv2d Groups 3 DoRA", "Conv2dGroups", {"target_modules": ["conv2d"], "use_dora": True}, "conv2d_groups",
        "dora", "dora_conv", slow=True),
    row("Conv2d Groups 4 DoRA", "Conv2dGroups2", {"target_modules": ["conv2d"], "use_dora": True}, "conv2d_groups",
        "dora", "dora_conv", slow=True),
    row("Conv3d 1 LoRA", "Conv3d", {"target_modules": ["conv3d"]}, "conv3d", slow=True),
    row("Conv3d 2 LoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"]}, "conv3d"),
    row("Conv3d 3 DoRA", "Conv3d", {"target_modules": ["conv3d"], "use_dora": True}, "conv3d", "dora", "dora_conv",
        slow=True),
    row("Conv3d 4 DoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"], "use_dora": True}, "conv3d", "dora",
        "dora_conv", slow=True),
    row("Conv3d 5 LoRA lora_bias", "Conv3d", {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32},
        "conv3d", "lora_bias", "conv_lora_bias", slow=True),
    row("Conv3d 1x1 LoRA", "Conv3d1x1", {"target_modules": ["conv3d"]}, "conv3d"),
    # nn.MultiheadAttention: PEFT adapts the packed q/k/v input projection and out_proj
    row("MHA 1 LoRA", "MHA", {"target_modules": ["mha"]}, "mha", slow=True),
    row("MHA 2 LoRA", "MHA", {"target_modules": ["mha", "lin0"], "r": 4, "lora_alpha": 6}, "mha"),
    # a bare parameter used as x @ weight
    row("ParamMLP 1 LoRA target_parameters", "ParamMLP", {"target_parameters": ["lin0.weight"]}, "target_parameters"),
    row("ParamMLP 2 LoRA target_parameters", "ParamMLP",
        {"target_parameters": ["lin0.weight", "lin1.weight"], "r": 4, "lora_alpha": 16}, "target_parameters",
        slow=True),
]

# capability -> (fixture model, LoraConfig fields, the module whose tensors must then train)
PROBES = {
    "linear": ("MLP", {"target_modules": ["lin0", "lin1"]}, "lin1"),
    "gaussian": ("MLP", {"target_modules": ["lin0"], "init_lora_weights": "gaussian"}, "lin0"),
    "init_false": ("MLP", {"target_modules": ["lin0"], "init_lora_weights": False}, "lin0"),
    "pissa": ("MLP", {"target_modules": ["lin0"], "r": 2, "init_lora_weights": "pissa"}, "lin0"),
    "olora": ("MLP", {"target_modules": ["lin0"], "r": 2, "init_lora_weights": "olora"}, "lin0"),
    "lora_bias": ("MLP", {"target_modules": ["lin0"], "lora_bias": True}, "lin0"),
    "dora": ("MLP", {"target_modules": ["lin0"], "use_dora": True}, "lin0"),
    # DoRA on the other layer kinds (lora_dora_embedding, lora_dora_conv)
    "dora_embedding": ("EmbMLP", {"target_modules": ["emb"], "use_dora": True}, "emb"),
    "dora_conv": ("Conv2d", {"target_modules": ["conv2d"], "use_dora": True}, "conv2d"),
    "modules_to_save": ("MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}, "lin1"),
    "layers_to_transform": ("DeepMLP", {"target_modules": ["lin0"], "layers_to_transform": [1]},
                            "model.layers.1.lin0"),
    "gpt2_conv1d": ("EmbConv1D", {"target_modules": ["conv1d"]}, "conv1d"),
    "embedding": ("EmbMLP", {"target_modules": ["emb"]}, "emb"),
    "trainable_tokens": ("EmbMLP", {"target_modules": ["lin0"], "trainable_token_indices": {"emb": [1, 2]}}, "emb"),
    "conv1d": ("Conv1d", {"target_modules": ["conv1d"]}, "conv1d"),
    "conv2d": ("Conv2d", {"target_modules": ["conv2d"]}, "conv2d"),
    "conv2d_groups": ("Conv2dGroups2", {"target_modules": ["conv2d"]}, "conv2d"),
    "conv3d": ("Conv3d", {"target_modules": ["conv3d"]}, "conv3d"),
    "mha": ("MHA", {"target_modules": ["mha"]}, "mha"),
    "conv_lora_bias": ("Conv2d", {"target_modules": ["conv2d"], "lora_bias": True}, "conv2d"),
    "target_parameters": ("MLP", {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]}, "lin1"),
    # PEFT's names for lorafx's alpha, dropout and init (see test_compile_takes_peft_option_names)
    "peft_names": ("MLP", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.0,
                           "init_lora_weights": True}, "lin0"),
}
assert all(c in PROBES for r in ROWS for c in r.requires), "every capability a row needs has a probe"
assert len({r.id for r in ROWS}) == len(ROWS), "row ids are unique"
assert all(r.model in MODELS for r in ROWS)


# -- options, capabilities -----------------------------------------------------------------------------
# PEFT's names where lorafx has its own: passed by PEFT's name once compile takes them
OWN_NAMES = {"lora_alpha": "alpha", "lora_dropout": "dropout", "init_lora_weights": "init"}


def compile_options(options: dict, translate: Optional[bool] = None) -> dict:
    """``lorafx.compile`` options for LoraConfig fields ``options``: the fields the row sets, with
    the LoraConfig's r, lora_alpha and target_modules (PEFT's defaults: lorafx's alpha default
    differs, and its target_modules default is all-linear where a LoraConfig's is None).  With
    ``translate`` (by default: while compile does not take PEFT's names for alpha, dropout and
    init, see ``takes_peft_names``) lorafx's names are passed instead; the capability
    "peft_names" and test_compile_takes_peft_option_names hold that gap open."""
    config = peft.LoraConfig(**options)  # PEFT's own checks first
    out = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": None, **options}
    if translate is None:
        translate = not takes_peft_names()
    for name, own in OWN_NAMES.items():
        if translate and name in out:
            value = out.pop(name)
            if name == "init_lora_weights" and value is True:
                continue  # lorafx's default: kaiming-uniform A, B = 0, as PEFT's
            out[own] = value
    return out


def compile_row(model_name: str, options: dict, base=None, x=None, dtype=torch.float64, translate=None):
    base = build(model_name, dtype) if base is None else base
    x = example_input(model_name, dtype=dtype) if x is None else x
    return lorafx.compile(base, example_inputs=(x,), dynamic=False, seed=0, **compile_options(options, translate))


def _adapts(model_name: str, options: dict, module: str, translate=None) -> bool:
    """Whether compile takes ``options`` for the fixture ``model_name`` and then trains tensors of ``module``."""
    try:
        cm = compile_row(model_name, options, dtype=torch.float32, translate=translate)
    except Exception:  # refused (unknown option, a layer lorafx cannot adapt, not supported yet)
        return False
    return any(n == module or n.startswith(module + ".") for n, p in cm.named_parameters() if p.requires_grad)


@functools.lru_cache(maxsize=None)
def takes_peft_names() -> bool:
    """Whether compile takes lora_alpha, lora_dropout and init_lora_weights by these names."""
    return _adapts(*PROBES["peft_names"], translate=False)


@functools.lru_cache(maxsize=None)
def capabilities() -> Dict[str, bool]:
    """{capability: whether lorafx has it}, probed once: compile takes the probe's options and
    trains tensors of the probe's module."""
    return {name: takes_peft_names() if name == "peft_names" else _adapts(*PROBES[name]) for name in PROBES}


def _needs(request, requires) -> None:
    """Mark the running test xfail(strict) when lorafx lacks one of ``requires``."""
    missing = [c for c in requires if not capabilities()[c]]
    if missing:
        request.node.add_marker(pytest.mark.xfail(strict=True, reason="needs " + ", ".join(missing)))


def _param(r: Row):
    return pytest.param(r, id=r.id, marks=[pytest.mark.slow] if r.slow else [])


@pytest.fixture
def case(request):
    """The row, marked xfail(strict) when lorafx lacks a capability it needs."""
    r = request.param
    _needs(request, r.requires)
    return r


table = pytest.mark.parametrize("case", [_param(r) for r in ROWS], indirect=True)


# -- PEFT state-dict keys on both sides --------------------------------------------------------------
def peft_model(base, options):
    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**options))


def peft_tensors(pm) -> Dict[str, torch.nn.Parameter]:
    """{PEFT state-dict key (no "base_model.model.", no adapter name): pm's trainable parameter}."""
    params = {(p.data_ptr(), p.shape): p for p in pm.parameters() if p.requires_grad}
    out = {}
    for key, value in peft.get_peft_model_state_dict(pm).items():
        assert key.startswith(PREFIX), key
        out[key[len(PREFIX):]] = params[(value.data_ptr(), value.shape)]
    assert len(out) == len(params), "every trainable PEFT tensor is saved under one key"
    return out


def lorafx_tensors(cm) -> Dict[str, str]:
    """{PEFT state-dict key: path of cm's tensor}, as save_adapter writes them: the adapters as each
    record's kind names them (``adapter_io.peft_keys``), and the tensors of modules_to_save and
    trainable tokens (``adapter_io.trainable_tensors``, where lorafx has it)."""
    if hasattr(adapter_io, "peft_keys"):
        out = dict(adapter_io.peft_keys(cm.lora_records()))
    else:  # before the op-kind hooks: linear adapters only
        out = {f"{s}.lora_{ab}.weight": getattr(r, f"lora_{ab}") for s, r in cm.lora_records().items() for ab in "AB"}
    others = getattr(adapter_io, "trainable_tensors", None) or getattr(adapter_io, "_trainable_tensors", None)
    if others is not None:
        out.update(others(cm))
    return out


def trainable(cm) -> Dict[str, torch.nn.Parameter]:
    return {n: p for n, p in cm.named_parameters() if p.requires_grad}


def perturb(tensors, seed: int, scale: float = 0.3) -> None:
    """Add seeded noise to each tensor (in key order): adapters become non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key in sorted(tensors):
            t = tensors[key]
            t.add_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * scale)


def train_steps(cm, x, steps: int = 2, lr: float = 1e-2) -> None:
    cm.train()
    opt = torch.optim.Adam([p for p in cm.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        out = cm(x)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(step), dtype=out.dtype)
        (out * weight).sum().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    cm.eval()


def nonzero_init(options) -> bool:
    return options.get("init_lora_weights", True) is False


def state(module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}


def assert_same_state(before, module, what: str = "") -> None:
    after = module.state_dict()
    assert set(after) == set(before), what
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{what}: {k} changed"


# -- the checks ----------------------------------------------------------------------------------------
# Each check takes the Run of one row and leaves it ready for the next: they run in this order on one
# compiled model (compiling once per row keeps the table fast enough for the default suite).
class Run:
    def __init__(self, case: Row, tmp_path):
        self.case, self.tmp = case, tmp_path
        self.base, self.x = build(case.model, case.dtype), example_input(case.model, dtype=case.dtype)
        self.tol, self.init_tol, self.merge_tol = tolerances(case.dtype)
        self.base_state = state(self.base)
        self.base_flags = {n: p.requires_grad for n, p in self.base.named_parameters()}

    def assert_base_untouched(self, when: str) -> None:
        assert_same_state(self.base_state, self.base, f"the user's model changed ({when})")
        assert {n: p.requires_grad for n, p in self.base.named_parameters()} == self.base_flags, when
        assert not self.base.training, when


def check_compile(run: Run) -> None:
    """lorafx.compile takes the row's LoraConfig fields and trains exactly the tensors PEFT trains:
    the same PEFT state-dict keys, with the same shapes, and nothing else."""
    run.cm = compile_row(run.case.model, run.case.options, run.base, run.x).eval()
    run.pm = peft_model(run.base, run.case.options).eval()
    run.mine, run.theirs = lorafx_tensors(run.cm), peft_tensors(run.pm)
    assert sorted(run.mine) == sorted(run.theirs), (
        f"lorafx trains other tensors than PEFT (by PEFT state-dict key): lorafx only "
        f"{sorted(set(run.mine) - set(run.theirs))}, PEFT only {sorted(set(run.theirs) - set(run.mine))}")
    for key, path in run.mine.items():
        assert tuple(get_attr(run.cm, path).shape) == tuple(run.theirs[key].shape), f"shape of {key}"
    extra = sorted(set(trainable(run.cm)) - set(run.mine.values()))
    assert not extra and set(run.mine.values()) <= set(trainable(run.cm)), (
        f"only the adapters (and modules_to_save, tokens) train: also {extra}")
    run.assert_base_untouched("compile")


def check_init(run: Run) -> None:
    """The compiled model computes what the base model computes, except for PEFT's
    init_lora_weights=False (A and B both random), which must change the outputs."""
    with torch.no_grad():
        got, want = run.cm(run.x), run.base(run.x)
    if nonzero_init(run.case.options):
        assert (got - want).abs().max() > 1e-6, "init_lora_weights=False: the adapters should change the outputs"
    else:
        torch.testing.assert_close(got, want, **run.init_tol, msg=lambda m: f"not the identity at init: {m}")


def check_parity(run: Run) -> None:
    """With PEFT's tensors (made non-trivial) copied in by key: PEFT's outputs and PEFT's gradient
    for every adapter tensor."""
    cm, pm, x = run.cm, run.pm, run.x
    perturb(run.theirs, seed=2)
    with torch.no_grad():
        for key, path in run.mine.items():
            get_attr(cm, path).copy_(run.theirs[key])
    got, want = cm(x), pm(x)
    torch.testing.assert_close(got, want, **run.tol, msg=lambda m: f"outputs differ from PEFT's: {m}")
    with pm.disable_adapter(), torch.no_grad():
        assert (want - pm(x)).abs().max() > 1e-6, "the adapters should change PEFT's outputs"
    weight = torch.randn(got.shape, generator=torch.Generator().manual_seed(3), dtype=got.dtype)
    (got * weight).sum().backward()
    (want * weight).sum().backward()
    for key, path in run.mine.items():
        g_cm, g_pm = get_attr(cm, path).grad, run.theirs[key].grad
        assert g_cm is not None and g_pm is not None, f"no gradient for {key}"
        torch.testing.assert_close(g_cm, g_pm, **run.tol, msg=lambda m: f"gradient of {key} differs from PEFT's: {m}")
    cm.zero_grad(set_to_none=True)
    pm.zero_grad(set_to_none=True)


def check_merge(run: Run) -> None:
    """merge(), unmerge() and merge_and_unload() compute what the unmerged model computes, and
    merge_and_unload leaves the compiled model as it was."""
    cm, x = run.cm, run.x
    with torch.no_grad():
        want = cm(x)
        cm.merge()
        torch.testing.assert_close(cm(x), want, **run.merge_tol, msg=lambda m: f"merged: {m}")
        cm.unmerge()
        torch.testing.assert_close(cm(x), want, **run.tol, msg=lambda m: f"unmerged again: {m}")
        plain = cm.merge_and_unload()
        torch.testing.assert_close(plain(x), want, **run.merge_tol, msg=lambda m: f"merge_and_unload: {m}")
        torch.testing.assert_close(cm(x), want, **run.tol, msg=lambda m: f"after merge_and_unload: {m}")
    run.assert_base_untouched("merge")


def check_training(run: Run) -> None:
    """A few optimizer steps change the adapters (and modules_to_save, trainable tokens) only;
    the user's model is untouched."""
    cm = run.cm
    before = state(cm)
    train_steps(cm, run.x, steps=3)
    changed = {k for k, v in cm.state_dict().items() if not torch.equal(v, before[k])}
    adapters = set(run.mine.values())
    assert changed, "training changed nothing"
    assert changed <= adapters, f"frozen tensors changed: {sorted(changed - adapters)}"
    run.assert_base_untouched("training")


def check_save_adapter(run: Run) -> None:
    """cm.save_adapter -> PeftModel.from_pretrained(base) computes what cm computes."""
    folder = str(run.tmp / "lorafx")
    with torch.no_grad():
        want = run.cm(run.x)
    run.cm.save_adapter(folder)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(run.base), folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(run.x), want, **run.tol, msg=lambda m: f"PEFT loading lorafx's adapter: {m}")


def check_load_adapter(run: Run) -> None:
    """PEFT's save_pretrained -> lorafx.load_adapter(base) computes what the PeftModel computes."""
    folder = str(run.tmp / "peft")
    run.pm.save_pretrained(folder)
    cm = lorafx.load_adapter(run.base, folder, example_inputs=(run.x,), dynamic=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(cm(run.x), run.pm(run.x), **run.tol,
                                   msg=lambda m: f"lorafx loading PEFT's adapter: {m}")
    run.assert_base_untouched("load_adapter")


CHECKS = (check_compile, check_init, check_parity, check_merge, check_training, check_save_adapter,
          check_load_adapter)


@functools.lru_cache(maxsize=None)
def peft_adds_mha_out_proj_twice() -> bool:
    """Whether this PEFT adds an nn.MultiheadAttention's out_proj update twice: PEFT 0.21.2's
    MultiheadAttention.merge() (which its forward calls) writes W + ΔW into out_proj, then calls
    out_proj.merge(), which adds ΔW again through ``.data``, unseen by autograd (unmerge() subtracts
    both, so the weights come back); huggingface/peft#3774 fixes it.  Its forward is then W + 2ΔW
    with the gradients of W + ΔW, which no consistent implementation can match."""
    base, x = build("MHA"), example_input("MHA")
    pm = peft_model(base, {"target_modules": ["mha"], "init_lora_weights": False})
    layer, ref = pm.base_model.model.mha, copy.deepcopy(base)
    with torch.no_grad():
        ref.mha.in_proj_weight += layer.get_delta_weight("default")
        ref.mha.out_proj.weight += 2 * layer.base_layer.out_proj.get_delta_weight("default")
        return torch.allclose(pm(x), ref(x), rtol=1e-9, atol=1e-10)


def add_mha_out_proj_once(monkeypatch) -> None:
    """While PEFT has the bug above, compare with the W + ΔW it intends: out_proj.merge() / unmerge()
    called from inside MultiheadAttention.merge() / unmerge() keep PEFT's bookkeeping only."""
    if not peft_adds_mha_out_proj_twice():
        return
    from peft.tuners.lora import layer as L
    inside = []
    mha_merge, mha_unmerge, merge, unmerge = (L.MultiheadAttention.merge, L.MultiheadAttention.unmerge,
                                              L.Linear.merge, L.Linear.unmerge)

    def within(method):
        def run(self, *args, **kwargs):
            inside.append(self.get_base_layer().out_proj)
            try:
                return method(self, *args, **kwargs)
            finally:
                inside.pop()
        return run

    def out_proj_merge(self, safe_merge=False, adapter_names=None):
        if inside and self is inside[-1]:
            self.merged_adapters.extend(adapter_names or self.active_adapters)
            return None
        return merge(self, safe_merge=safe_merge, adapter_names=adapter_names)

    def out_proj_unmerge(self):
        if inside and self is inside[-1]:
            self.merged_adapters.clear()
            return None
        return unmerge(self)

    monkeypatch.setattr(L.MultiheadAttention, "merge", within(mha_merge))
    monkeypatch.setattr(L.MultiheadAttention, "unmerge", within(mha_unmerge))
    monkeypatch.setattr(L.Linear, "merge", out_proj_merge)
    monkeypatch.setattr(L.Linear, "unmerge", out_proj_unmerge)


@table
def test_row(case, tmp_path, monkeypatch):
    """Every check of the table on one row, in order (see the module docstring)."""
    if "mha" in case.requires:
        add_mha_out_proj_once(monkeypatch)
    run = Run(case, tmp_path)
    for check in CHECKS:
        check(run)


# -- beside the table ------------------------------------------------------------------------------------
def test_the_linear_rows_run():
    """The probes see what lorafx had before issue 13: linear layers, transformers' Conv1D, gaussian init."""
    caps = capabilities()
    assert caps["linear"] and caps["gpt2_conv1d"] and caps["gaussian"], caps


def test_compile_takes_peft_option_names(request):
    """A LoraConfig's fields go to compile as they are: lora_alpha, lora_dropout and init_lora_weights
    are lorafx's alpha, dropout and init; giving both names is an error."""
    _needs(request, ["peft_names"])
    x = example_input("MLP")
    fields = {"target_modules": ["lin0"], "r": 4, "lora_alpha": 2, "lora_dropout": 0.25,
              "init_lora_weights": "gaussian"}
    peft_named = lorafx.compile(build("MLP"), example_inputs=(x,), dynamic=False, seed=0,
                                **compile_options(fields, translate=False))
    own = lorafx.compile(build("MLP"), example_inputs=(x,), dynamic=False, seed=0, target_modules=["lin0"], r=4,
                         alpha=2, dropout=0.25, init="gaussian")
    (a,), (b,) = peft_named.lora_records().values(), own.lora_records().values()
    assert (a.scale, a.dropout) == (b.scale, b.dropout) == (0.5, 0.25)
    for p in (a.lora_A, a.lora_B):
        torch.testing.assert_close(get_attr(peft_named, p), get_attr(own, p), rtol=0, atol=0)
    with pytest.raises((TypeError, ValueError), match="lora_alpha"):
        lorafx.compile(build("MLP"), example_inputs=(x,), dynamic=False, target_modules=["lin0"], alpha=2,
                       lora_alpha=2)


class _WithNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = torch.nn.Linear(10, 20)
        self.norm = torch.nn.LayerNorm(20)
        self.lin1 = torch.nn.Linear(20, 2)

    def forward(self, x):
        return self.lin1(self.norm(self.lin0(x)))


@pytest.mark.parametrize("targets", [["lin0", "norm", "lin1"], r"lin0|norm"])
def test_mixed_supported_and_unsupported_targets_compile_nothing(targets):
    """No silent partial adaptation: a LayerNorm (which no LoRA kind adapts) named beside linears is
    an error naming it and its kind, and the model is left exactly as it was."""
    torch.manual_seed(0)
    model = _WithNorm().eval()
    before = state(model)
    modules = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match=r"'norm' \(LayerNorm\)"):
        lorafx.compile(model, example_inputs=(torch.randn(3, 10),), r=2, target_modules=targets)
    assert_same_state(before, model)
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert all(p.requires_grad for p in model.parameters()) and not model.training
