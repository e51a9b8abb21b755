"""FoldLoRAIntoBase and lorafx::lora_linear_folded: A stored as rows of the frozen weight's buffer.

The rewrite promises equal outputs and gradients (float64), that W and A really are views
of one buffer (an optimizer step on A is seen by the folded GEMM, nothing copied per step),
and that merge, adapters on disk, new input signatures and the cost model keep working.
"""
import copy

import pytest
import sympy
import torch
from hypothesis import given, strategies as st
from torch.utils.flop_counter import FlopCounterMode

import lorafx
from lorafx.dialect.folded import folded_rule
from lorafx.dialect.linear import lora_linear_reference as reference, schedule_counts
from lorafx.passes import FoldLoRAIntoBase, InsertLoRA, SelectSchedule, set_training_mode
from lorafx.passes.cost_model import BATCH, SEQ, evaluate, graph_cost
from lorafx.passes.fold_lora import FOLDED_SUFFIX
from lorafx.testing import assert_equivalent, attention_models, lora_configs, residual_models

from conftest import _tiny, adapter_names, ids, randomise_lora_B

FOLDED = torch.ops.lorafx.lora_linear_folded.default
LORA_OPS = (torch.ops.lorafx.lora_linear.default, torch.ops.lorafx.lora_linear_xa.default)


def _lora_graph(family, **options):
    model = _tiny(family, torch.float64).eval()
    gm = lorafx.capture(model, (ids(2, 12),))
    set_training_mode(gm, False)
    InsertLoRA(r=2, seed=0, **options)(gm)
    SelectSchedule()(gm)
    randomise_lora_B(gm)
    return gm


def _folded_copy(gm):
    """A deep copy of ``gm`` with FoldLoRAIntoBase run on it (fold after copying: a deep copy
    clones tensors one by one, so the views of a folded buffer would become separate tensors)."""
    after = copy.deepcopy(gm)
    info = FoldLoRAIntoBase()(after).info
    return after, info


# -- the op ------------------------------------------------------------------------------------
def _op_inputs(m=5, n=4, r=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = dict(dtype=torch.float64)
    W = torch.randn(m, n, generator=g, **d)
    ext = torch.cat([W, torch.randn(r, n, generator=g, **d)])
    A = torch.nn.Parameter(ext[m:])  # a view: the same memory as the buffer's last rows
    B = torch.randn(m, r, generator=g, **d).requires_grad_()
    bias = torch.randn(m, generator=g, **d)
    x = torch.randn(2, 3, n, generator=g, **d).requires_grad_()
    return x, W, ext, A, B, bias


@pytest.mark.parametrize("rule", ["f1b1k", "f1b5k", "f1b1k|5:f1b5k"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_folded_op_equals_reference_and_passes_opcheck(rule, with_bias):
    x, W, ext, A, B, bias = _op_inputs()
    b = bias if with_bias else None
    schedule_counts.clear()
    y, xa = FOLDED(x, ext, b, A, B, 2.0, None, 0.0, rule)
    assert schedule_counts[("fwd", "fold")] == 1 and not schedule_counts[("fwd", "fold-copy")]
    assert y.shape == (2, 3, 5) and y.stride() == (21, 7, 1)  # a block of the (tokens, m + r) product: no copy
    want = reference(x, W, b, A, B, 2.0)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(xa, (x.reshape(-1, 4) @ A.t()).t())
    got = torch.autograd.grad(y.square().sum(), [x, A, B])
    expected = torch.autograd.grad(want.square().sum(), [x, A, B])
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)
    torch.library.opcheck(FOLDED, (x, ext, b, A, B, 2.0, None, 0.0, rule))
    assert torch.autograd.gradcheck(lambda x, B: FOLDED(x, ext, b, A, B, 2.0, None, 0.0, rule)[0], (x, B))


def test_folded_op_flops_and_errors():
    x, W, ext, A, B, _ = _op_inputs()
    with FlopCounterMode(display=False) as fc:
        y, _ = FOLDED(x, ext, None, A, B, 2.0, None, 0.0, "f1b1k")
        y.sum().backward()
    assert fc.get_total_flops() == sum(lorafx.schedules.lora_flops("f1b1k", 6, 4, 5, 2))
    with pytest.raises(ValueError, match="f1b1k / f1b5k only"):
        FOLDED(x, ext, None, A, B, 2.0, None, 0.0, "f2b5k")
    with pytest.raises(ValueError, match="no adapter dropout"):
        FOLDED(x, ext, None, A, B, 2.0, torch.ones(2, 3, 4, dtype=torch.bool), 0.1, "f1b1k")
    # A not in the buffer's memory (a clone): the same numbers, through a copy, and counted as such
    schedule_counts.clear()
    y, _ = FOLDED(x, ext.clone(), None, A, B, 2.0, None, 0.0, "f1b1k")
    assert schedule_counts[("fwd", "fold-copy")] == 1
    torch.testing.assert_close(y, reference(x, W, None, A, B, 2.0))


def test_folded_rule():
    assert str(folded_rule("f1b1|187:f2b1|689:f2b5")) == "f1b1k|689:f1b5k"
    assert str(folded_rule("f2b5")) == "f1b5k"
    assert str(folded_rule("f1b1k|300:f2b5k")) == "f1b1k|300:f1b5k"
    assert folded_rule("f1b3") is None and folded_rule("f1b1|64:f1b4") is None


# -- the pass ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "bert"])
def test_fold_equals_unfolded(family):
    gm = _lora_graph(family)
    after, info = _folded_copy(gm)
    sites = sum(n.target in LORA_OPS for n in gm.graph.nodes)
    assert info["folded_adapters"] == sites and not info["kept"], info
    assert not any(n.target in LORA_OPS for n in after.graph.nodes)
    assert sum(n.target is FOLDED for n in after.graph.nodes) == sites
    schedule_counts.clear()
    for x in (ids(3, 9), ids(2, 40, seed=2)):  # two token counts: b1 and b5 in the rules
        assert_equivalent(gm, after, {"input_ids": x}, param_names=adapter_names(gm), rtol=1e-9, atol=1e-11)
    assert schedule_counts[("fwd", "fold")] > 0 and not schedule_counts[("fwd", "fold-copy")]
    assert schedule_counts[("bwd", "b1")] > 0 and schedule_counts[("bwd", "b5")] > 0


@given(st.one_of(residual_models(), attention_models()), lora_configs(dropout=True),
       st.sampled_from(["auto", "f1b1", "f2b5", "f1b1|5:f2b5", "f1b1k", "f2b1k|5:f2b5k"]))
def test_fold_property(case, config, schedule):
    """On random models: outputs, input and adapter gradients equal; dropout (and, under
    "auto", b3/b4) sites left alone with their reason."""
    gm = lorafx.capture(case.model.eval(), example_kwargs=case.inputs)
    set_training_mode(gm, False)
    InsertLoRA(**config)(gm)
    SelectSchedule(schedule=schedule)(gm)
    randomise_lora_B(gm, config["seed"])
    sites = sum(n.target in LORA_OPS for n in gm.graph.nodes)
    after, info = _folded_copy(gm)
    assert info["folded_adapters"] + len(info["kept"]) == sites
    if config.get("dropout", 0.0) > 0:
        assert info["folded_adapters"] == 0 and all("dropout" in why for why in info["kept"].values())
    elif schedule != "auto":
        assert info["folded_adapters"] == sites
    else:
        assert all("b3/b4" in why for why in info["kept"].values())
    assert_equivalent(gm, after, case.inputs, param_names=adapter_names(gm), rtol=1e-9, atol=1e-11, msg=repr(case))


def test_fold_skips_conv1d_and_b3():
    info = _folded_copy(_lora_graph("gpt2"))[1]
    assert info["folded_adapters"] == 0 and all("Conv1D" in why for why in info["kept"].values())
    gm = _lora_graph("llama")
    SelectSchedule(schedule="f1b3")(gm)
    info = _folded_copy(gm)[1]
    assert info["folded_adapters"] == 0 and all("b3/b4" in why for why in info["kept"].values())


def test_weight_and_adapter_are_views_of_one_buffer_and_train_like_unfolded():
    gm = _lora_graph("llama")
    after, _ = _folded_copy(gm)
    site = "model.layers.0.self_attn.q_proj"
    ext = after.get_buffer(f"{site}.weight{FOLDED_SUFFIX}")
    W, A = after.get_parameter(f"{site}.weight"), after.get_parameter(f"{site}.lora_A")
    m = W.shape[0]
    assert W.data_ptr() == ext.data_ptr() and A.data_ptr() == ext[m:].data_ptr()
    assert not W.requires_grad and A.requires_grad
    assert set(after.state_dict()) == set(gm.state_dict())  # the buffer is not persistent
    for k, v in gm.state_dict().items():
        assert torch.equal(after.state_dict()[k], v), k
    # a few AdamW steps on both: the same adapters (the optimizer writes A in place, into the buffer)
    x = {"input_ids": ids(3, 9, seed=5)}
    opts = [torch.optim.AdamW([p for p in m_.parameters() if p.requires_grad], lr=1e-2) for m_ in (gm, after)]
    for _ in range(3):
        for model, opt in zip((gm, after), opts):
            model(**x).logits.square().mean().backward()
            opt.step()
            opt.zero_grad()
    assert torch.equal(ext[m:], A.detach())
    for (n1, p1), (n2, p2) in zip(gm.named_parameters(), after.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p2, p1, rtol=1e-9, atol=1e-11)


def test_compile_fold_a_merges_saves_and_recaptures(tmp_path):
    model = _tiny("llama", torch.float64).eval()
    plain = lorafx.compile(model, example_inputs=(ids(2, 12),), r=2, seed=0)
    cm = lorafx.compile(model, example_inputs=(ids(2, 12),), r=2, seed=0, fold_a=True)
    report = {r.name: r.info for r in cm.report().passes}
    # RecomputeInputs takes the sites whose input is cheap to rebuild; the fold takes the rest
    assert report["FoldLoRAIntoBase"]["folded_adapters"] == sum(n.target is FOLDED for n in cm.graph_module.graph.nodes) > 0
    for m_ in (plain, cm):
        randomise_lora_B(m_.graph_module)
    x = {"input_ids": ids(3, 9, seed=1)}
    want = plain(**x).logits.detach()
    torch.testing.assert_close(cm(**x).logits, want, rtol=1e-9, atol=1e-11)
    # a new keyword signature is captured again and reuses the folded buffers
    schedule_counts.clear()
    out = cm(**x, labels=x["input_ids"])
    assert out.loss is not None and not schedule_counts[("fwd", "fold-copy")]
    # merge / unmerge / merge_and_unload
    cm.merge()
    torch.testing.assert_close(cm(**x).logits, want, rtol=1e-9, atol=1e-10)
    cm.unmerge()
    assert any(n.target is FOLDED for n in cm.graph_module.graph.nodes)
    torch.testing.assert_close(cm(**x).logits, want, rtol=1e-9, atol=1e-11)
    merged = cm.merge_and_unload()
    assert not any(n.target is FOLDED or "lora" in str(n.target) for n in merged.graph.nodes)
    assert not any(name.endswith(FOLDED_SUFFIX) for name, _ in merged.named_buffers())
    torch.testing.assert_close(merged(**x).logits, want, rtol=1e-9, atol=1e-10)
    # adapters on disk: saved from the folded model, loaded into a fresh folded one (written into the buffer)
    cm.save_adapter(str(tmp_path))
    again = lorafx.load_adapter(model, str(tmp_path), fold_a=True)
    assert any(n.target is FOLDED for n in again.graph_module.graph.nodes)
    torch.testing.assert_close(again(**x).logits, want, rtol=1e-9, atol=1e-11)
    with pytest.raises(TypeError, match="fold_a must be True or False"):
        lorafx.compile(model, example_inputs=(ids(2, 12),), fold_a="yes")


def test_cost_model_counts_the_folded_op():
    import transformers as T
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=96, attn_implementation="eager")
    cm = lorafx.compile(T.LlamaForCausalLM(cfg), r=4, fold_a=True).eval()
    assert any(n.target is FOLDED for n in cm.graph_module.graph.nodes)
    total = graph_cost(cm.graph_module)
    assert total.fwd_flops.free_symbols <= {BATCH, SEQ}
    for batch, seq in ((3, 11), (2, 40)):
        x = torch.randint(0, 96, (batch, seq), generator=torch.Generator().manual_seed(seq))
        with FlopCounterMode(display=False) as f:
            out = cm(input_ids=x)
        fwd = f.get_total_flops()
        with FlopCounterMode(display=False) as f:
            out.logits.sum().backward()
        bwd = f.get_total_flops()
        assert abs(evaluate(total.fwd_flops, batch=batch, seq=seq) - fwd) <= 0.01 * fwd
        assert abs(evaluate(total.bwd_flops, batch=batch, seq=seq) - bwd) <= 0.01 * bwd
    assert isinstance(total.fwd_flops, sympy.Expr)
