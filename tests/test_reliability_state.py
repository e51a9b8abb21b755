"""A hypothesis state machine over a compiled model's operations.

Operations: a training step, merge, unmerge, ``load_state_dict`` of another compiled
model's state (merged or not), ``save_adapter``/``load_adapter``, ``train()``/``eval()``,
a call with a new keyword signature, and ``merge_and_unload``.  After every step the
compiled model's outputs equal a plain-PyTorch reference (the source model with
``y += scale * x A^T B^T`` hooks on the adapted linears, its A and B tracked by the
test, trained by the test's own SGD step), and the user's model is bit-identical to
its snapshot.
"""
import copy
import shutil
import tempfile

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

import lorafx

SITES = ("up", "down", "head")
R, ALPHA, LR = 2, 4.0, 0.05
SCALE = ALPHA / R


class Block(nn.Module):
    """norm -> up -> gelu -> down (+ residual) -> head; optional keyword inputs change the graph."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(6)
        self.up = nn.Linear(6, 12)
        self.down = nn.Linear(12, 6)
        self.head = nn.Linear(6, 3)
        self.drop = nn.Dropout(0.2)

    def forward(self, x, shift=None, gate=None, target=None):
        h = self.up(self.norm(x))
        if shift is not None:
            h = h + shift
        h = x + self.down(self.drop(F.gelu(h)))
        if gate is not None:
            h = h * gate
        out = self.head(h)
        if target is not None:
            return F.mse_loss(out, target)
        return out


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(4, 5, 6, generator=g, dtype=torch.float64),
            "shift": torch.randn(4, 5, 12, generator=g, dtype=torch.float64),
            "gate": torch.rand(4, 5, 6, generator=g, dtype=torch.float64),
            "target": torch.randn(4, 5, 3, generator=g, dtype=torch.float64)}


SIGNATURES = [("x",), ("x", "shift"), ("x", "gate"), ("x", "shift", "gate")]
steps_run = {"count": 0}


def adapters(cm):
    return {s: (cm.get_parameter(f"{s}.lora_A").detach().clone(), cm.get_parameter(f"{s}.lora_B").detach().clone())
            for s in SITES}


class Reference:
    """The source model plus LoRA done by hand: forward hooks adding scale * x A^T B^T."""

    def __init__(self, source):
        self.model = copy.deepcopy(source)
        self.ab = {}
        for site in SITES:
            getattr(self.model, site).register_forward_hook(self._hook(site))

    def _hook(self, site):
        def hook(module, args, out):
            A, B = self.ab[site]
            return out + SCALE * (args[0] @ A.t()) @ B.t()
        return hook

    def __call__(self, ab, training=False, **kwargs):
        self.ab = ab
        self.model.train(training)
        return self.model(**kwargs)


class CompiledModelMachine(RuleBasedStateMachine):
    @initialize(seed=st.integers(0, 2**16))
    def setup(self, seed):
        torch.manual_seed(seed)
        self.source = Block().double()
        self.source.train()
        self.snapshot = {k: v.detach().clone() for k, v in self.source.state_dict().items()}
        self.params = {k: v for k, v in self.source.state_dict(keep_vars=True).items()}
        x = _inputs(seed)["x"]
        options = dict(r=R, alpha=ALPHA, target_modules=list(SITES))
        self.cm = lorafx.compile(self.source, example_inputs=(x,), seed=seed, **options)
        self.other = lorafx.compile(self.source, example_inputs=(x,), seed=seed + 1, **options)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for model in (self.cm, self.other):
                for p in model.trainable_parameters().values():
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
        self.expected = adapters(self.cm)
        self.reference = Reference(self.source)
        self.merged = False
        self.training = True
        self.folder = tempfile.mkdtemp(prefix="lorafx-state-")
        self.seed = seed

    def teardown(self):
        folder = getattr(self, "folder", None)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def _count(self):
        steps_run["count"] += 1

    # -- operations -----------------------------------------------------------------------------------
    @precondition(lambda self: not self.merged)
    @rule(seed=st.integers(0, 100))
    def train_step(self, seed):
        inputs = _inputs(seed)
        # the reference step: plain autograd on leaf copies of A and B; eval mode on both sides,
        # so the model's dropout does not draw different masks
        self.cm.eval()
        loss = self.cm(x=inputs["x"], target=inputs["target"])
        loss.backward()
        ab = {s: (A.clone().requires_grad_(True), B.clone().requires_grad_(True)) for s, (A, B) in self.expected.items()}
        ref_loss = self.reference(ab, x=inputs["x"], target=inputs["target"])
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss)
        with torch.no_grad():
            for p in self.cm.trainable_parameters().values():
                p -= LR * p.grad
                p.grad = None
        self.expected = {s: ((A - LR * A.grad).detach(), (B - LR * B.grad).detach()) for s, (A, B) in ab.items()}
        self.cm.train(self.training)
        self._count()

    @precondition(lambda self: self.merged)
    @rule()
    def train_while_merged_is_refused(self):
        was = self.cm.training
        self.cm.train()
        with pytest.raises(RuntimeError, match="unmerge"):
            self.cm(**{"x": _inputs(0)["x"]})
        self.cm.train(was)
        self._count()

    @rule()
    def merge(self):
        self.cm.merge()
        self.merged = True
        self._count()

    @rule()
    def unmerge(self):
        self.cm.unmerge()
        self.merged = False
        self._count()

    @rule(other_merged=st.booleans())
    def load_other_state_dict(self, other_merged):
        if other_merged:
            self.other.merge()
        state = self.other.state_dict()
        self.other.unmerge()
        self.cm.load_state_dict(state)
        self.expected = adapters(self.other)
        self._count()

    @rule(seed=st.integers(0, 100))
    def save_then_load_adapter(self, seed):
        self.cm.save_adapter(self.folder)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # scribble, then load the saved adapter back
            for p in self.cm.trainable_parameters().values():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        self.cm.load_adapter(self.folder)
        self._count()

    @rule(mode=st.booleans())
    def set_mode(self, mode):
        self.cm.train(mode)
        self.training = mode
        self._count()

    @rule(signature=st.sampled_from(SIGNATURES), seed=st.integers(0, 100))
    def call_with_a_signature(self, signature, seed):
        inputs = {k: v for k, v in _inputs(seed).items() if k in signature}
        self._check_outputs(self.cm, inputs)
        self._count()

    @rule()
    def merge_and_unload(self):
        plain = self.cm.merge_and_unload()
        assert not any(n.endswith(("lora_A", "lora_B")) for n, _ in plain.named_parameters())
        self._check_outputs(plain, {"x": _inputs(1)["x"]}, set_mode=False)
        assert self.cm.merged == self.merged
        self._count()

    # -- checks ---------------------------------------------------------------------------------------
    def _check_outputs(self, model, inputs, set_mode=True):
        if set_mode:
            model.eval()
        with torch.no_grad():
            got = model(**inputs)
            want = self.reference(self.expected, **inputs)
        if set_mode:
            model.train(self.training)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)

    @invariant()
    def outputs_match_the_reference(self):
        self._check_outputs(self.cm, {"x": _inputs(2)["x"]})
        assert self.cm.merged == self.merged and self.cm.training == self.training

    @invariant()
    def users_model_is_untouched(self):
        now = self.source.state_dict(keep_vars=True)
        assert now.keys() == self.params.keys()
        for key, value in self.snapshot.items():
            assert now[key] is self.params[key], f"{key} was replaced"
            assert torch.equal(now[key].detach(), value), f"{key} was written"
        assert all(p.grad is None and p.requires_grad for p in self.source.parameters())
        assert self.source.training


def test_compiled_model_state_machine():
    """At least 200 operations across runs, each followed by both invariants."""
    steps_run["count"] = 0
    config = settings(max_examples=10, stateful_step_count=30, deadline=None, derandomize=True)
    for _ in range(3):
        run_state_machine_as_test(CompiledModelMachine, settings=config)
        if steps_run["count"] >= 200:
            break
    assert steps_run["count"] >= 200, steps_run
