"""Sparse LoRA (LoRS): the op against eager masking, pruning, the pipeline, merge and I/O."""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import lorafx
from lorafx.dialect import SPARSE, SparseRecord, kind_of, lora_nodes
from lorafx.dialect.sparse import (lora_linear_sparse_reference, merged_sparse_weight, sparse_candidates,
                                   sparse_flops)
from lorafx.meta import get_record, graph_record
from lorafx.passes.prune_weights import prune_mask
from lorafx.testing import assert_equivalent, models

from conftest import Warnings, ids

OP = torch.ops.lorafx.lora_linear_sparse


def _pruned(shape, sparsity, gen, dtype=torch.float64):
    W = torch.randn(*shape, generator=gen, dtype=dtype)
    keep = prune_mask(W.abs(), sparsity, None, per_row=False)
    return W * keep


# -- the op --------------------------------------------------------------------------------------

def _surrogate_reference(x, W, bias, A, B, s, mask=None, p=0.0):
    """The documented surrogate: forward (W + s·BA) ⊙ M, adapter gradients of the unmasked
    adapter (s·Bᵀ G, s·G Aᵀ with G = dyᵀ d(x)), dX exact."""
    keep = (W != 0).to(W.dtype)
    delta = s * B @ A
    straight = (delta * keep).detach() + delta - delta.detach()  # value masked, gradient unmasked
    xd = x if mask is None else x * mask / (1.0 - p)
    if mask is None:
        return F.linear(x, W + straight, bias)
    # with dropout the adapter reads d(x); dX through W ⊙ M and d(·) of the masked adapter
    x_det = F.linear(x, W, bias) + F.linear(xd, (delta * keep).detach())
    return x_det + F.linear(xd.detach(), straight) - F.linear(xd.detach(), (delta * keep).detach())


@settings(max_examples=40, deadline=None)
@given(tokens=st.integers(1, 7), n=st.integers(1, 9), m=st.integers(1, 9), r=st.integers(1, 4),
       sparsity=st.sampled_from([0.0, 0.3, 0.5, 0.9]), bias=st.booleans(), dropout=st.booleans(),
       three_d=st.booleans(), grad=st.sampled_from(["exact", "surrogate"]), seed=st.integers(0, 2**16),
       data=st.data())
def test_op_equals_eager_masking(tokens, n, m, r, sparsity, bias, dropout, three_d, grad, seed, data):
    """Outputs and exact-mode gradients equal autograd through (W + s·BA) ⊙ M; surrogate-mode
    adapter gradients equal the documented straight-through formula; dX is exact in both."""
    schedule = data.draw(st.sampled_from(sparse_candidates(grad)))
    gen = torch.Generator().manual_seed(seed)
    shape = (2, tokens, n) if three_d else (tokens, n)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    W = _pruned((m, n), sparsity, gen)
    A = torch.randn(r, n, generator=gen, dtype=torch.float64, requires_grad=True)
    B = torch.randn(m, r, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(m, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    p = 0.25 if dropout else 0.0
    mask = (torch.rand(shape, generator=gen) > p) if dropout else None
    s = 1.5
    y = OP(x, W, b, A, B, s, mask, p, schedule, grad)
    inputs = [x, A, B] + ([b] if bias else [])
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(y, inputs, gy)
    exact = lora_linear_sparse_reference(x, W, b, A, B, s, mask, p)
    torch.testing.assert_close(y, exact, rtol=1e-10, atol=1e-10)
    if grad == "exact":
        want = torch.autograd.grad(exact, inputs, gy)
    else:
        want = torch.autograd.grad(_surrogate_reference(x, W, b, A, B, s, mask, p), inputs, gy)
        want_exact_dx = torch.autograd.grad(exact, [x], gy)[0]
        torch.testing.assert_close(got[0], want_exact_dx, rtol=1e-10, atol=1e-10)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_surrogate_differs_from_exact_by_the_pruned_part_of_the_gradient():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    W = _pruned((4, 6), 0.5, gen)
    A = torch.randn(2, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    B = torch.randn(4, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    grads = {g: torch.autograd.grad(OP(x, W, None, A, B, 2.0, None, 0.0, "f2b4", g), [A, B], dy)
             for g in ("exact", "surrogate")}
    pruned_part = (W == 0).to(W.dtype) * (dy.t() @ x)
    torch.testing.assert_close(grads["surrogate"][0] - grads["exact"][0], 2.0 * B.detach().t() @ pruned_part)
    torch.testing.assert_close(grads["surrogate"][1] - grads["exact"][1], 2.0 * pruned_part @ A.detach().t())


def test_weight_gradient_is_masked():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    W = _pruned((5, 4), 0.5, gen).requires_grad_(True)
    A = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    B = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    dW, = torch.autograd.grad(OP(x, W, None, A, B, 1.0, None, 0.0, "f2b5", "surrogate").sum(), [W])
    assert torch.all(dW[W == 0] == 0)


@pytest.mark.parametrize("schedule,grad", [("f2b5", "surrogate"), ("f2b4", "surrogate"), ("f2b4", "exact")])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("need_x", [True, False])
def test_flop_formulas_match_flop_counter(schedule, grad, dropout, need_x):
    b_, n_, m_, r_ = 24, 20, 12, 3
    x = torch.randn(b_, n_, requires_grad=need_x)
    W = _pruned((m_, n_), 0.5, torch.Generator().manual_seed(0), torch.float32)
    A = torch.randn(r_, n_, requires_grad=True)
    B = torch.randn(m_, r_, requires_grad=True)
    mask = torch.rand(b_, n_) > 0.1 if dropout else None
    with FlopCounterMode(display=False) as fwd_counter:
        y = OP(x, W, None, A, B, 1.0, mask, 0.1 if dropout else 0.0, schedule, grad)
    with FlopCounterMode(display=False) as bwd_counter:
        y.sum().backward()
    fwd, bwd = sparse_flops(schedule, b_, n_, m_, r_, dropout=dropout, grad=grad, x_requires_grad=need_x)
    assert fwd_counter.get_total_flops() == fwd
    assert bwd_counter.get_total_flops() == bwd


def test_rules_outside_the_mode_are_refused():
    x, W, A, B = torch.randn(2, 4), torch.randn(3, 4), torch.randn(1, 4), torch.randn(3, 1)
    with pytest.raises(ValueError, match="f2b4"):
        OP(x, W, None, A, B, 1.0, None, 0.0, "f2b5", "exact")
    with pytest.raises(ValueError, match="not one of"):
        OP(x, W, None, A, B, 1.0, None, 0.0, "f1b1", "surrogate")
    with pytest.raises(ValueError, match="grad must be one of"):
        OP(x, W, None, A, B, 1.0, None, 0.0, "f2b4", "approximate")


def test_merge_keeps_kept_entries_that_cancel_nonzero():
    W = torch.tensor([[1.0, 0.0, -2.0]])
    delta = torch.tensor([[-1.0, 5.0, 1.0]])
    merged = merged_sparse_weight(W, delta)
    assert torch.equal(merged == 0, W == 0)
    assert merged[0, 2] == -1.0 and merged[0, 0] != 0 and abs(float(merged[0, 0])) < 1e-37


# -- masks ---------------------------------------------------------------------------------------

def test_masks_prune_exact_counts_per_group():
    scores = torch.rand(6, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    per_matrix = prune_mask(scores, 0.5, None, per_row=False)
    assert int((~per_matrix).sum()) == 48
    assert scores[~per_matrix].max() <= scores[per_matrix].min()
    per_row = prune_mask(scores, 0.25, None, per_row=True)
    assert ((~per_row).sum(1) == 4).all()
    for nm in ((2, 4), (4, 8)):
        keep = prune_mask(scores, 0.0, nm, per_row=True)
        groups = keep.reshape(6, -1, nm[1])
        assert (groups.sum(-1) == nm[0]).all()
        kept = scores.reshape(6, -1, nm[1])
        assert (kept.masked_fill(~groups, 2).min(-1).values >= kept.masked_fill(groups, -1).max(-1).values).all()


class _TwoLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4, bias=False)
        self.head = torch.nn.Linear(4, 2, bias=False)

    def forward(self, x):
        return self.head(self.fc(x))


def test_wanda_weights_entries_by_their_inputs_norms():
    model = _TwoLinear()
    with torch.no_grad():
        model.fc.weight.copy_(torch.ones(4, 8))
        model.fc.weight[:, :4] = 0.5  # smaller weights, but on inputs 100x larger
    x = torch.ones(3, 8)
    x[:, :4] = 100.0
    wanda = lorafx.prune(model, 0.5, method="wanda", calibration=[{"x": x}], example_kwargs={"x": x},
                         modules=["fc"])
    magnitude = lorafx.prune(model, 0.5, method="magnitude", example_kwargs={"x": x}, modules=["fc"])
    assert (wanda.fc.weight[:, :4] != 0).all() and (wanda.fc.weight[:, 4:] == 0).all()
    assert (magnitude.fc.weight[:, :4] == 0).all() and (magnitude.fc.weight[:, 4:] != 0).all()
    assert (model.fc.weight != 0).all()  # not inplace: the model is unchanged
    assert (wanda.head.weight != 0).all()


def test_prune_inplace_writes_the_model_and_nothing_else():
    model = _TwoLinear()
    before = model.head.weight.detach().clone()
    x = torch.randn(3, 8)
    out = lorafx.prune(model, 0.5, pattern="2:4", method="magnitude", example_kwargs={"x": x}, inplace=True,
                       modules=["fc"])
    assert out is model
    assert (model.fc.weight.reshape(4, 2, 4) != 0).sum(-1).eq(2).all()
    assert torch.equal(model.head.weight, before)


# -- the compiled model -------------------------------------------------------------------------

class _MaskedLoRA(torch.nn.Module):
    """Eager reference: a frozen pruned linear plus a LoRA, y = x ((W + s·BA) ⊙ M)ᵀ + b."""

    def __init__(self, linear, A, B, scale, surrogate=False):
        super().__init__()
        self.weight = torch.nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().clone(),
                                                                        requires_grad=False)
        self.lora_A = torch.nn.Parameter(A.detach().clone())
        self.lora_B = torch.nn.Parameter(B.detach().clone())
        self.scale, self.surrogate = scale, surrogate

    def forward(self, x):
        if self.surrogate:
            return _surrogate_reference(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scale)
        return lora_linear_sparse_reference(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scale)


def _reference(cm, surrogate=False):
    """The source model with its pruned weights and, at every sparse site, _MaskedLoRA with
    the compiled model's adapters."""
    ref = copy.deepcopy(cm.source_model)
    gm = cm.graph_module
    for node in lora_nodes(gm.graph):
        assert kind_of(node) is SPARSE
    for path in graph_record(gm).sparsity:
        module, _, name = path.rpartition(".")
        getattr(ref.get_submodule(module), name).data = gm.get_parameter(path).detach().clone()
    for site, rec in cm.lora_records().items():
        parent, _, name = site.rpartition(".")
        owner = ref.get_submodule(parent) if parent else ref
        setattr(owner, name, _MaskedLoRA(ref.get_submodule(site), gm.get_parameter(rec.lora_A),
                                         gm.get_parameter(rec.lora_B), rec.scale, surrogate))
    return ref


def _sparse_options(case, draw):
    """Sparsity options valid for ``case``'s linears (N:M only where every input width divides)."""
    widths = [m.in_features for m in case.model.modules() if isinstance(m, torch.nn.Linear)]
    patterns = ["unstructured"] + [p for p, m in (("2:4", 4), ("4:8", 8)) if all(w % m == 0 for w in widths)]
    pattern = draw(st.sampled_from(patterns))
    sparsity = draw(st.sampled_from([0.25, 0.5, 0.75])) if pattern == "unstructured" else 0.5
    method = draw(st.sampled_from(["magnitude", "wanda"]))
    return dict(sparsity=sparsity, sparsity_pattern=pattern, sparsity_method=method, target_modules="all-linear",
                calibration=[case.inputs], r=draw(st.integers(1, 2)), alpha=2.0, seed=draw(st.integers(0, 99)))


def _randomize_b(cm, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for rec in cm.lora_records().values():
            B = cm.graph_module.get_parameter(rec.lora_B)
            B.copy_(torch.randn(B.shape, generator=gen, dtype=B.dtype))


@given(case=models(), grad=st.sampled_from(["exact", "surrogate"]), data=st.data())
def test_compiled_sparse_lora_equals_eager_masking(case, grad, data):
    """Every adapted linear of a pruned model: outputs and the gradients of inputs and adapters
    equal eager masking (exact mode) or the surrogate formula (surrogate mode), in float64."""
    options = _sparse_options(case, data.draw)
    cm = lorafx.compile(case.model, example_kwargs=case.inputs, sparse_grad=grad, **options)
    _randomize_b(cm)
    names = [p for rec in cm.lora_records().values() for p in (rec.lora_A, rec.lora_B)]
    assert_equivalent(_reference(cm, surrogate=grad == "surrogate"), cm, case.inputs, param_names=names,
                      rtol=1e-9, atol=1e-10)


@given(case=models(), grad=st.sampled_from(["exact", "surrogate"]), steps=st.integers(1, 4), data=st.data())
def test_zero_pattern_survives_training_and_merge(case, grad, steps, data):
    options = _sparse_options(case, data.draw)
    cm = lorafx.compile(case.model, example_kwargs=case.inputs, sparse_grad=grad, **options)
    pruned = {p: cm.graph_module.get_parameter(p).detach().clone() for p in graph_record(cm.graph_module).sparsity}
    assume(pruned)
    opt = torch.optim.Adam([p for p in cm.parameters() if p.requires_grad], lr=0.5)
    cm.train()
    for _ in range(steps):
        y = cm(**case.inputs)
        (y if isinstance(y, torch.Tensor) else y[0]).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    merged_sd = cm.merged_state_dict()
    unloaded = cm.merge_and_unload()
    cm.merge()
    for path, before in pruned.items():
        for after in (unloaded.get_parameter(path), cm.graph_module.get_parameter(path), merged_sd[path]):
            assert torch.equal(after == 0, before == 0), path
            assert int((after == 0).sum()) == int((before == 0).sum())
    cm.unmerge()
    for path, before in pruned.items():
        assert torch.equal(cm.graph_module.get_parameter(path), before)


@pytest.fixture(scope="module")
def llama(tiny_model):
    return tiny_model("llama"), {"input_ids": ids(2, 8)}


def test_pruning_inside_compile_never_writes_the_model(llama):
    model, kw = llama
    before = {k: (v.data_ptr(), v.detach().clone()) for k, v in model.state_dict().items()}
    cm = lorafx.compile(model, example_kwargs=kw, sparsity=0.5, sparsity_method="magnitude",
                        target_modules=["q_proj", "v_proj"])
    W = cm.graph_module.get_parameter("model.layers.0.mlp.up_proj.weight")
    assert float((W == 0).float().mean()) == 0.5
    for k, v in model.state_dict().items():
        assert v.data_ptr() == before[k][0] and torch.equal(v, before[k][1]), k
    rec = graph_record(cm.graph_module)
    assert "lm_head.weight" not in rec.sparsity and len(rec.sparsity) == 14  # 7 linears x 2 layers
    kinds = {kind_of(n).name for n in lora_nodes(cm.graph_module.graph)}
    assert kinds == {"lora_linear_sparse"}
    line = next(l for l in str(cm.report()).splitlines() if l.startswith("PruneWeights"))
    assert "14 weights, 50.0% zeros (magnitude, unstructured)" in line
    assert "sparse(unstructured 50%, magnitude, exact grad)" in cm.graph_report()


def test_new_call_signature_binds_the_same_pruned_weights(llama):
    model, kw = llama

    class Counting(list):
        iterations = 0

        def __iter__(self):
            Counting.iterations += 1
            return super().__iter__()

    calibration = Counting([{"input_ids": kw["input_ids"]}])
    cm = lorafx.compile(model, example_kwargs=kw, sparsity=0.5, calibration=calibration,
                        target_modules=["q_proj", "v_proj"])
    first = Counting.iterations
    cm(input_ids=kw["input_ids"], labels=kw["input_ids"])  # a second signature: captured, replayed
    assert len(cm._variants) == 2 and Counting.iterations == first  # Wanda did not run again
    for gm in cm._variants.values():
        for path in graph_record(cm.graph_module).sparsity:
            assert gm.get_parameter(path) is cm.graph_module.get_parameter(path)
        assert all(kind_of(n) is SPARSE for n in lora_nodes(gm.graph))


def test_gpt2_conv1d_weights_are_pruned_in_their_layout():
    from lorafx.models import load_model
    model, kw = load_model("tiny-gpt2")
    cm = lorafx.compile(model, example_kwargs=kw, sparsity=0.5, sparsity_method="wanda", sparsity_pattern="2:4",
                        calibration=[kw], target_modules=["c_attn"], sparse_grad="exact", seed=0)
    W = cm.graph_module.get_parameter("transformer.h.0.attn.c_attn.weight")  # (in, out)
    assert (W.t().reshape(W.shape[1], -1, 4) != 0).sum(-1).eq(2).all()
    _randomize_b(cm)
    merged = cm.merge_and_unload().get_parameter("transformer.h.0.attn.c_attn.weight")
    assert torch.equal(merged == 0, W == 0)


def test_lors_init_uses_the_top_singular_vectors_of_the_mean_gradient(llama):
    model, kw = llama
    batches = [{"input_ids": kw["input_ids"]}, {"input_ids": kw["input_ids"].flip(1)}]
    cm = lorafx.compile(model, example_kwargs=kw, calibration=batches, init="lors", sparsity=0.5,
                        sparsity_method="magnitude", target_modules=["q_proj"], r=4, seed=0)
    # the mean dense gradient, by plain autograd on the pruned model
    ref = copy.deepcopy(model)
    for path in graph_record(cm.graph_module).sparsity:
        ref.get_parameter(path).data = cm.graph_module.get_parameter(path).detach().clone()
    W = ref.model.layers[1].self_attn.q_proj.weight
    W.requires_grad_(True)
    G = sum(torch.autograd.grad(ref(**b, labels=b["input_ids"]).loss, [W])[0] for b in batches) / 2
    V = torch.linalg.svd(G.double()).Vh[:4]
    A = cm.graph_module.get_parameter("model.layers.1.self_attn.q_proj.lora_A").detach().double()
    torch.testing.assert_close((A @ V.t()).abs(), torch.eye(4, dtype=torch.float64), atol=1e-4, rtol=0)
    assert torch.equal(cm.graph_module.get_parameter("model.layers.1.self_attn.q_proj.lora_B"),
                       torch.zeros(32, 4))


def test_sparse_adapter_round_trip_and_peft_hint(llama, tmp_path):
    model, kw = llama
    pruned = lorafx.prune(model, 0.5, method="magnitude", pattern="2:4", example_kwargs=kw)
    cm = lorafx.compile(pruned, example_kwargs=kw, sparsity="keep", sparse_grad="exact",
                        target_modules=["q_proj", "v_proj"], seed=0)
    _randomize_b(cm)
    with Warnings() as logged:
        cm.save_adapter(str(tmp_path))
    assert any("(W != 0)" in r.getMessage() for r in logged)
    loaded = lorafx.load_adapter(pruned, str(tmp_path), example_kwargs=kw)
    assert {get_record(n, SparseRecord).grad for n in lora_nodes(loaded.graph_module.graph)} == {"exact"}
    cm.eval(), loaded.eval()
    torch.testing.assert_close(loaded(**kw).logits, cm(**kw).logits)
    with pytest.raises(ValueError, match="none of the"):
        lorafx.load_adapter(model, str(tmp_path), example_kwargs=kw)  # the dense base: prune it first


@pytest.mark.parametrize("grad", ["exact", "surrogate"])
def test_cost_model_counts_what_the_graph_runs(grad):
    import transformers as T
    from lorafx.passes.cost_model import evaluate, graph_cost
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=96, attn_implementation="eager")
    cm = lorafx.compile(T.LlamaForCausalLM(cfg), sparsity=0.5, sparsity_method="magnitude", sparse_grad=grad,
                        target_modules=["q_proj", "down_proj"], r=4).eval()
    total = graph_cost(cm.graph_module)
    ids = torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        out = cm(input_ids=ids)
    fwd = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        out.logits.sum().backward()
    bwd = counter.get_total_flops()
    assert abs(evaluate(total.fwd_flops, batch=3, seq=11) - fwd) <= 0.01 * fwd
    assert abs(evaluate(total.bwd_flops, batch=3, seq=11) - bwd) <= 0.01 * bwd


# -- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value,error,match", [
    (-0.1, ValueError, r"in \[0, 1\)"), (1.0, ValueError, r"in \[0, 1\)"), (float("nan"), ValueError, r"in \[0, 1\)"),
    (True, TypeError, "fraction"), ("half", TypeError, "fraction"),
])
def test_bad_sparsity_is_refused(llama, value, error, match):
    model, kw = llama
    with pytest.raises(error, match=match):
        lorafx.compile(model, example_kwargs=kw, sparsity=value)


def test_bad_sparsity_settings_are_refused_and_nothing_changes(llama):
    model, kw = llama
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cases = [
        (dict(sparsity=1 / 3, sparsity_pattern="2:3", sparsity_method="magnitude"), "not a multiple of 3"),
        (dict(sparsity=0.5, sparsity_pattern="2-4"), "'N:M'"),
        (dict(sparsity=0.5, sparsity_pattern="3:2"), "0 < N < M"),
        (dict(sparsity=0.6, sparsity_pattern="2:4"), "prunes exactly 0.5"),
        (dict(sparsity=0.5, sparsity_method="sparsegpt"), "sparsity_method"),
        (dict(sparse_grad="exact"), "only applies with sparsity"),
        (dict(sparsity=0.5, sparse_grad="dense"), "sparse_grad"),
        (dict(sparsity=0.5), "needs calibration data"),  # Wanda without calibration
        (dict(sparsity="keep"), "none of the 14 selected linear weights has a zero"),
        (dict(init="lors"), "init='lors'.*calibration"),
    ]
    for options, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            lorafx.compile(model, example_kwargs=kw, **options)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_n_m_pattern_that_does_not_divide_the_inputs_names_the_layer():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(6, 4)
            self.out = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.fc(x))

    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match=r"fc has 6 input features, not a multiple of 4"):
        lorafx.compile(Odd(), example_kwargs={"x": x}, sparsity=0.5, sparsity_pattern="2:4",
                       sparsity_method="magnitude")
    with pytest.raises(ValueError, match="needs a sparsity in"):
        lorafx.prune(Odd(), "keep", example_kwargs={"x": x})


def test_cli_prunes_and_reports(llama, tmp_path, capsys):
    from lorafx.cli import main
    model, _ = llama
    model.save_pretrained(tmp_path / "hf")
    out = tmp_path / "out"
    rc = main(["compile", "--model", str(tmp_path / "hf"), "--out", str(out), "--sparsity", "0.5",
               "--sparsity-pattern", "2:4", "--sparse-grad", "exact", "--target-modules", "q_proj,v_proj",
               "--no-draw"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "sparsity=0.5 sparsity_method=magnitude sparsity_pattern=2:4 sparse_grad=exact" in captured.out
    assert "14 weights, 50.0% zeros (magnitude, 2:4)" in captured.out
    assert (out / "graph.txt").read_text().count("sparse(2:4 50%, magnitude, exact grad)") == 4
    for argv, match in ((["--sparsity", "1.5"], "must be in [0, 1)"),
                        (["--sparsity", "0.6", "--sparsity-pattern", "2:4"], "prunes exactly 0.5")):
        assert main(["compile", "--model", str(tmp_path / "hf"), "--out", str(out), *argv]) == 2
        assert match in capsys.readouterr().err


def test_a_fixed_schedule_is_fitted_to_the_sparse_schedules(llama):
    model, kw = llama
    for grad, want in (("surrogate", "f2b5"), ("exact", "f2b4")):
        cm = lorafx.compile(model, example_kwargs=kw, sparsity=0.5, sparsity_method="magnitude", sparse_grad=grad,
                            schedule="f1b1", target_modules=["q_proj"])
        nodes = lora_nodes(cm.graph_module.graph)
        assert {SPARSE.view(n).schedule for n in nodes} == {want}
        select = next(r for r in cm.report().passes if r.name == "SelectSchedule")
        assert set(select.info["choices"].values()) == {want}
