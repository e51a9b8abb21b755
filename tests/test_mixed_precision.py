"""Mixed precision: bf16 base with fp32 adapters (adapter_dtype= / PEFT's autocast_adapter_dtype),
all-bf16, and torch.autocast around a float32 model -- in the ops, in compile, and against PEFT."""
import copy

import pytest
import torch

import lorafx
from lorafx.dialect.linear import lora_linear_reference

from conftest import ids, randomise_lora_B

BF16 = torch.bfloat16


def _tensors(dtype_base, dtype_adapter, tokens=24, n=16, m=12, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g)
    x = rand(2, tokens // 2, n).to(dtype_base).requires_grad_()
    W, b = rand(m, n).to(dtype_base) * 0.3, rand(m).to(dtype_base)
    A = (rand(r, n) * 0.3).to(dtype_adapter).requires_grad_()
    B = (rand(m, r) * 0.3).to(dtype_adapter).requires_grad_()
    return x, W, b, A, B


def _run(fn, x, W, b, A, B, dy):
    y = fn(x, W, b, A, B)
    y.backward(dy)
    grads = tuple(t.grad.clone() for t in (x, A, B))
    for t in (x, A, B):
        t.grad = None
    return y.detach(), grads


@pytest.mark.parametrize("schedule", ["f1b1", "f2b5", "f1b3", "f1b1k", "f2b5k"])
def test_op_bf16_input_fp32_adapters(schedule):
    """x, W in bf16 and A, B in fp32 (PEFT's autocast_adapter_dtype): the adapter products run in fp32,
    the output and dx are bf16, dA and dB fp32; values as PEFT computes them (base in bf16, the sum in
    fp32, rounded once).  The merged-weight kernels (f2, b5), which would round W + s B A to bf16, run
    as f1 / b1 there."""
    from lorafx.dialect import schedule_counts
    x, W, b, A, B = _tensors(BF16, torch.float32)
    op = torch.ops.lorafx.lora_linear_xa if schedule.endswith("k") else torch.ops.lorafx.lora_linear
    ours = lambda x, W, b, A, B: (lambda out: out[0] if isinstance(out, tuple) else out)(
        op(x, W, b, A, B, 0.5, None, 0.0, schedule))
    peft = lambda x, W, b, A, B: (torch.nn.functional.linear(x, W, b)
                                  + 0.5 * torch.nn.functional.linear(torch.nn.functional.linear(x.float(), A), B)
                                  ).to(BF16)
    dy = torch.randn(2, 12, 12, generator=torch.Generator().manual_seed(1)).to(BF16)
    schedule_counts.clear()
    y, (dx, dA, dB) = _run(ours, x, W, b, A, B, dy)
    assert set(schedule_counts) == {("fwd", "f1"), ("bwd", "b3" if schedule == "f1b3" else "b1")}
    y_ref, (dx_ref, dA_ref, dB_ref) = _run(peft, x, W, b, A, B, dy)
    assert (y.dtype, dx.dtype, dA.dtype, dB.dtype) == (BF16, BF16, torch.float32, torch.float32)
    torch.testing.assert_close(y, y_ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(dA, dA_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dB, dB_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dx, dx_ref, rtol=2e-2, atol=3e-2)


def test_ops_under_autocast():
    """torch.autocast("cpu", bfloat16) around float32 tensors: lora_linear computes in bf16 like an
    autocast nn.Linear and returns bf16; A's and B's gradients stay fp32.  The recompute op, whose
    sources autocast leaves in fp32, rebuilds x and casts it as autocast did: the same gradients."""
    x, W, b, A, B = _tensors(torch.float32, torch.float32)
    dy = torch.randn(2, 12, 12, generator=torch.Generator().manual_seed(1))
    F = torch.nn.functional

    def autocast(fn):
        def run(*args):
            with torch.autocast("cpu", dtype=BF16):
                return fn(*args)
        return run

    ours = autocast(lambda x, W, b, A, B: torch.ops.lorafx.lora_linear(x, W, b, A, B, 0.5, None, 0.0, "f1b1"))
    ref = autocast(lambda x, W, b, A, B: F.linear(x, W, b) + 0.5 * F.linear(F.linear(x, A), B))
    y, (dx, dA, dB) = _run(ours, x, W, b, A, B, dy)
    y_ref, (dx_ref, dA_ref, dB_ref) = _run(ref, x, W, b, A, B, dy)
    assert y.dtype == BF16 and (dx.dtype, dA.dtype, dB.dtype) == (torch.float32,) * 3
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    for got, want in ((dx, dx_ref), (dA, dA_ref), (dB, dB_ref)):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    # the recompute op: x = h * 2 rebuilt in backward from h (fp32), cast to bf16 as autocast cast x
    h = (x.detach() / 2).requires_grad_()
    rec = autocast(lambda h, W, b, A, B: torch.ops.lorafx.lora_linear_recompute(
        h * 2, W, b, A, B, 0.5, None, 0.0, "f1b1", "aten.mul.Tensor(s0, 2)", [h]))
    plain = autocast(lambda h, W, b, A, B: torch.ops.lorafx.lora_linear(h * 2, W, b, A, B, 0.5, None, 0.0, "f1b1"))
    y1, (dh1, dA1, dB1) = _run(rec, h, W, b, A, B, dy)
    y2, (dh2, dA2, dB2) = _run(plain, h, W, b, A, B, dy)
    assert torch.equal(y1, y2) and torch.equal(dA1, dA2) and torch.equal(dB1, dB2) and torch.equal(dh1, dh2)
    # the plain-autograd definition of the op agrees under autocast too
    y3 = autocast(lora_linear_reference)(x, W, b, A, B, 0.5)
    torch.testing.assert_close(y3, y, rtol=2e-2, atol=2e-2)


def test_adapter_dtype_option():
    """adapter_dtype= and PEFT's autocast_adapter_dtype= choose A's and B's dtype; the model trains:
    bf16 output, fp32 adapter gradients; giving both, or a bad dtype, is refused before capture."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).to(BF16)
    x = torch.randn(4, 16).to(BF16)
    for options in ({"autocast_adapter_dtype": True},):  # (adapter_dtype="float32": the slow tests' LLaMA)
        cm = lorafx.compile(model, example_inputs=(x,), r=4, seed=0, target_modules=["0", "2"], **options)
        assert {p.dtype for p in cm.trainable_parameters().values()} == {torch.float32}
        assert {p.dtype for n, p in cm.named_parameters() if not p.requires_grad} == {BF16}
        y = cm(x)
        assert y.dtype == BF16
        y.float().pow(2).mean().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in cm.trainable_parameters().values())
    from lorafx.passes import InsertLoRA
    assert InsertLoRA().dtype_for(BF16) == BF16  # lorafx's default: the weight's dtype
    assert InsertLoRA(adapter_dtype="float32").dtype_for(BF16) == torch.float32
    assert InsertLoRA(autocast_adapter_dtype=True).dtype_for(torch.float16) == torch.float32
    assert InsertLoRA(autocast_adapter_dtype=True).dtype_for(torch.float64) == torch.float64
    assert InsertLoRA(adapter_dtype=torch.bfloat16).adapter_dtype == InsertLoRA(adapter_dtype="bf16").adapter_dtype \
        == "bfloat16"
    with pytest.raises(ValueError, match="pass one of them"):
        lorafx.compile(model, example_inputs=(x,), adapter_dtype="float32", autocast_adapter_dtype=True)
    with pytest.raises(ValueError, match="adapter_dtype must be a floating dtype"):
        lorafx.compile(model, example_inputs=(x,), adapter_dtype="int8")


# -- whole models against PEFT (slow) ------------------------------------------------------------------
def _peft_copy(base, cm, autocast_adapter_dtype):
    """PEFT on a copy of ``base`` (all linears, r=4) with ``cm``'s A and B copied in."""
    import peft
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear")
    pm = peft.get_peft_model(copy.deepcopy(base), cfg, autocast_adapter_dtype=autocast_adapter_dtype)
    state = cm.state_dict()
    with torch.no_grad():
        for name, module in pm.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                site = name.replace("base_model.model.", "")
                module.lora_A["default"].weight.copy_(state[site + ".lora_A"])
                module.lora_B["default"].weight.copy_(state[site + ".lora_B"])
    return pm


def _peft_grads(pm):
    return {n.replace("base_model.model.", "").replace(".default.weight", ""): p.grad
            for n, p in pm.named_parameters() if p.requires_grad}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["bf16-base-fp32-adapters", "all-bf16", "autocast"])
def test_modes_train_and_match_peft(tiny_model, mode):
    """Each mode trains (loss falls, adapters change, dtypes as promised); with PEFT's adapters copied
    in, the loss and logits are PEFT's within bf16 rounding, and the adapter gradients are as close to a
    float64 reference as PEFT's own (both carry bf16 rounding noise)."""
    base = tiny_model("llama", torch.float32 if mode == "autocast" else BF16)
    options = {"adapter_dtype": "float32"} if mode == "bf16-base-fp32-adapters" else {}
    cm = lorafx.compile(base, example_inputs=(ids(2, 12),), r=4, seed=0, **options)
    randomise_lora_B(cm, scale=0.3)
    cm.train()
    adapter_dtype = BF16 if mode == "all-bf16" else torch.float32
    assert {p.dtype for p in cm.trainable_parameters().values()} == {adapter_dtype}
    pm = _peft_copy(base, cm, autocast_adapter_dtype=mode == "bf16-base-fp32-adapters")
    pm.train()
    assert {p.dtype for p in pm.parameters() if p.requires_grad} == {adapter_dtype}
    ref = _peft_copy(copy.deepcopy(base).double(), cm, False)
    x = ids(4, 12, seed=7)
    context = (lambda: torch.autocast("cpu", dtype=BF16)) if mode == "autocast" else \
        (lambda: torch.autocast("cpu", enabled=False))
    with context():
        ours, theirs = cm(input_ids=x, labels=x), pm(input_ids=x, labels=x)
    assert ours.logits.dtype == theirs.logits.dtype == BF16
    assert abs(ours.loss.item() - theirs.loss.item()) < 2e-2
    torch.testing.assert_close(ours.logits.float(), theirs.logits.float(), rtol=0, atol=0.1)
    ours.loss.backward()
    theirs.loss.backward()
    ref(input_ids=x, labels=x).loss.backward()
    want = _peft_grads(ref)
    mine = {n: p.grad for n, p in cm.trainable_parameters().items()}
    assert {g.dtype for g in mine.values()} == {adapter_dtype}
    # relative error of all adapter gradients together (per adapter, single bf16 roundings dominate)
    error = lambda grads: (sum((grads[k].double() - want[k]).norm() ** 2 for k in want) ** 0.5
                           / sum(want[k].norm() ** 2 for k in want) ** 0.5).item()
    assert error(mine) < 2 * error(_peft_grads(pm)) + 0.05, (error(mine), error(_peft_grads(pm)))
    # it trains: 4 AdamW steps on one batch
    cm.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in cm.trainable_parameters().items()}
    opt = torch.optim.AdamW(list(cm.trainable_parameters().values()), lr=1e-2)
    losses = []
    for _ in range(4):
        with context():
            loss = cm(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(p, before[n]) for n, p in cm.trainable_parameters().items())
    assert {p.dtype for p in cm.trainable_parameters().values()} == {adapter_dtype}


@pytest.mark.slow
def test_sparse_adapters_in_another_dtype_are_refused(tiny_model):
    """LoRS's kernel forms (W + s B A) * mask in one dtype: fp32 adapters on a pruned bf16 weight are
    refused, naming the option to drop."""
    with pytest.raises(ValueError, match="leave adapter_dtype unset"):
        lorafx.compile(tiny_model("llama", BF16), example_inputs=(ids(2, 12),), r=4, seed=0,
                       adapter_dtype="float32", sparsity=0.5, sparsity_method="magnitude")
