"""lorafx.eager: the fast eager path computes exactly what the ops compute."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import lorafx
from lorafx import eager


def _model_and_inputs(seed=0):
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=96)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 96, (2, 12))
    return model, ids


def _loss_and_grads(cm, ids, run):
    for p in cm.trainable_parameters().values():
        p.grad = None
    torch.manual_seed(1)  # the same dropout masks on both paths
    loss = run(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in cm.trainable_parameters().items()}


@pytest.fixture(scope="module", params=[0.0, 0.1], ids=["no-dropout", "dropout"])
def compiled(request):
    model, ids = _model_and_inputs()
    cm = lorafx.compile(model, example_kwargs={"input_ids": ids, "labels": ids}, r=4, seed=0,
                        dropout=request.param)
    with torch.no_grad():  # non-zero B, so every adapter product matters
        for name, p in cm.trainable_parameters().items():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    return cm, ids


def test_fast_path_is_bitwise_the_ops(compiled):
    cm, ids = compiled
    gm = cm.graph_module
    assert any(isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "lorafx"
               for n in gm.graph.nodes)
    want_loss, want = _loss_and_grads(cm, ids, gm)  # the graph module itself: the custom ops
    got_loss, got = _loss_and_grads(cm, ids, lambda **kw: eager.run(gm, (), kw))
    assert torch.equal(want_loss, got_loss)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert eager.fast_forward(gm) is not None  # the fast copy was built and used


def test_compiled_model_runs_the_fast_path(compiled):
    cm, ids = compiled
    eager._CLASSES.pop(cm.graph_module, None)
    cm(input_ids=ids, labels=ids)
    assert eager._CLASSES[cm.graph_module].get((cm.graph_module._code, True)) is not None
    assert getattr(cm.graph_module, "validate_inputs", True) is True  # the module itself is unchanged


def test_flop_counter_sees_the_ops(compiled):
    """Under a dispatch mode the fast path calls the op: FlopCounterMode counts the op's
    formula (forward) and the backward's GEMMs, exactly as without the fast path."""
    cm, ids = compiled
    gm = cm.graph_module
    counts = []
    for run in (gm, lambda **kw: eager.run(gm, (), kw)):
        with FlopCounterMode(display=False) as fc:
            run(input_ids=ids, labels=ids).loss.backward()
        counts.append(fc.get_flop_counts()["Global"])
    assert counts[0] == counts[1]
    assert any("lorafx" in str(op) for op in counts[1])


def test_no_grad_and_eval(compiled):
    cm, ids = compiled
    gm = cm.graph_module
    with torch.no_grad():
        torch.manual_seed(1)
        want = gm(input_ids=ids, labels=ids).loss
        torch.manual_seed(1)
        got = eager.run(gm, (), {"input_ids": ids, "labels": ids}).loss
    assert torch.equal(want, got)
    cm.eval()
    try:
        with torch.no_grad():
            assert torch.equal(cm(input_ids=ids, labels=ids).loss, gm(input_ids=ids, labels=ids).loss)
    finally:
        cm.train()


def test_rebuilt_after_recompile(compiled):
    """A recompiled graph (another code) gets its own fast forward."""
    cm, ids = compiled
    gm = cm.graph_module
    eager.run(gm, (), {"input_ids": ids, "labels": ids})
    before = dict(eager._CLASSES[gm])
    gm.recompile()  # same graph, a new code string
    eager.run(gm, (), {"input_ids": ids, "labels": ids})
    assert eager._CLASSES[gm].get((gm._code, False)) is not None
    assert before  # (the old code's entry may stay, bounded)


def test_hooks_still_run(compiled):
    cm, ids = compiled
    gm = cm.graph_module
    seen = []
    handle = gm.register_forward_hook(lambda mod, args, kwargs_or_out, *rest: seen.append(mod))
    try:
        eager.run(gm, (), {"input_ids": ids, "labels": ids})
    finally:
        handle.remove()
    assert len(seen) == 1 and seen[0].__dict__ is gm.__dict__


def test_fast_op_matches_op_on_kwargs_and_defaults():
    x = torch.randn(3, 5, 8, requires_grad=True)
    W, A, B = torch.randn(6, 8), torch.randn(2, 8, requires_grad=True), torch.randn(6, 2, requires_grad=True)
    op = torch.ops.lorafx.lora_linear.default
    fast = eager.fast_op(op)
    gy = torch.randn(3, 5, 6)
    want = op(x, W, None, A, B, 0.5)
    got = fast(x, W, None, A, B, scale=0.5)
    assert torch.equal(want, got)
    g1 = torch.autograd.grad(want, [x, A, B], gy)
    g2 = torch.autograd.grad(got, [x, A, B], gy)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    with pytest.raises(TypeError):
        fast(x, W, None, A, B)  # scale is required, as for the op


def test_list_op_needs_and_grads():
    """The sibling op (tensor-list arguments) through the fast path: same outputs and grads,
    also when some inputs need no gradient."""
    torch.manual_seed(1)
    x = torch.randn(2, 7, 8, requires_grad=True)
    Ws = [torch.randn(6, 8), torch.randn(4, 8)]
    As = [torch.randn(2, 8, requires_grad=True), torch.randn(2, 8)]
    Bs = [torch.randn(6, 2, requires_grad=True), torch.randn(4, 2, requires_grad=True)]
    bs = [torch.randn(6, requires_grad=True)]
    args = (x, Ws, bs, [True, False], As, Bs, [0.5, 0.25], "f1b1;f2b5", "", [])
    op = torch.ops.lorafx.lora_linear_siblings.default
    fast = eager.fast_op(op)
    inputs = [x, As[0], Bs[0], Bs[1], bs[0]]
    results = []
    for f in (op, fast):
        ys = f(*args)
        assert isinstance(ys, list)
        grads = torch.autograd.grad([y.sum() * (i + 1) for i, y in enumerate(ys)], inputs)
        results.append((ys, grads))
    (y1, g1), (y2, g2) = results
    assert all(torch.equal(a, b) for a, b in zip(y1, y2))
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_fast_op_falls_back_without_autograd_formula():
    assert eager.fast_op(torch.ops.aten.mm.default) is None
    fast = eager.fast_op(torch.ops.lorafx.dropout_mask.default)
    x = torch.randn(4, 4)
    assert fast(x, 0.5, False).numel() == 0
