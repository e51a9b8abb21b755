"""LoRA on convolutions (lora_conv) and on nn.MultiheadAttention (its packed in_proj and its out_proj):
the op against a plain-autograd reference, and compile / identity / training / merge / PEFT parity and
the PEFT format both ways on small models."""
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils.flop_counter import FlopCounterMode

import lorafx
from lorafx.dialect.conv import conv_delta_weight, lora_conv_reference

op = torch.ops.lorafx.lora_conv
_CONVS = {1: torch.conv1d, 2: torch.conv2d, 3: torch.conv3d}


def _conv_args(dim, groups, stride, padding, dilation, kernel, r, mask=False, bias=True, unbatched=False, seed=0,
               dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()
    cin, cout = 2 * groups, 3 * groups
    size = (2, cin, *[5 + dim % 2] * dim)[1 if unbatched else 0:]
    x = mk(*size)
    W = mk(cout, cin // groups, *[kernel] * dim)
    b = mk(cout) if bias else None
    A = mk(r, cin, *[kernel] * dim)
    B = mk(cout, r // groups, *[1] * dim)
    m = (torch.rand(size, generator=g) > 0.3) if mask else None
    return x, W, b, A, B, [stride] * dim, [padding] * dim, [dilation] * dim, groups, m


# -- the op ---------------------------------------------------------------------------------------

@settings(max_examples=10, deadline=None)
@given(dim=st.sampled_from([1, 2, 3]), groups=st.sampled_from([1, 2]), stride=st.sampled_from([1, 2]),
       padding=st.sampled_from([0, 1]), dilation=st.sampled_from([1, 2]), kernel=st.sampled_from([1, 2, 3]),
       rmul=st.sampled_from([1, 2]), mask=st.booleans(), bias=st.booleans(), unbatched=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_lora_conv_matches_the_reference(dim, groups, stride, padding, dilation, kernel, rmul, mask, bias, unbatched,
                                         seed):
    """lora_conv equals PEFT's formula computed with plain autograd (conv + s·conv1x1(conv(d(x), A), B)):
    outputs and the gradients of x, W, b, A and B, over conv dims 1/2/3, groups, stride, padding, dilation,
    1x1 kernels, dropout masks and unbatched inputs."""
    x, W, b, A, B, s, p, d, groups, m = _conv_args(dim, groups, stride, padding, dilation, kernel, rmul * groups,
                                                 mask, bias, unbatched, seed)
    args = (W, b, A, B, 0.7, s, p, d, groups, m, 0.3 if mask else 0.0)
    y, ref = op(x, *args), lora_conv_reference(x, *args)
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(y)
    wrt = [t for t in (x, W, b, A, B) if t is not None]
    for got, want in zip(torch.autograd.grad(y, wrt, dy), torch.autograd.grad(ref, wrt, dy)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dim,groups,kernel", [(1, 1, 3), (2, 2, 3), (3, 1, 1)])
def test_lora_conv_gradcheck_and_flops(dim, groups, kernel):
    """Gradients by finite differences; FlopCounterMode counts the op as its three convolutions."""
    x, W, b, A, B, s, p, d, groups, m = _conv_args(dim, groups, 2, 1, 1, kernel, 2 * groups, mask=True)
    f = lambda x, A, B: op(x, W, b, A, B, 0.5, s, p, d, groups, m, 0.25)
    assert torch.autograd.gradcheck(f, (x, A, B), fast_mode=True)
    with FlopCounterMode(display=False) as counted:
        lora_conv_reference(x, W, b, A, B, 0.5, s, p, d, groups)
    with FlopCounterMode(display=False) as ours:
        op(x, W, b, A, B, 0.5, s, p, d, groups)
    assert ours.get_total_flops() == counted.get_total_flops() > 0


def test_lora_conv_backward_saves_only_inputs_and_skips_unneeded_gradients():
    x, W, b, A, B, s, p, d, groups, _ = _conv_args(2, 1, 1, 1, 1, 3, 2)
    W.requires_grad_(False)
    x = x.detach()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = op(x, W, b, A, B, 1.0, s, p, d, groups)
    assert {id(t) for t in saved} <= {id(x), id(W), id(A), id(B)}  # (and the empty mask: None here)
    y.sum().backward()
    assert W.grad is None and A.grad is not None and B.grad is not None and b.grad is not None


@pytest.mark.slow
def test_lora_conv_opcheck():
    """torch.library.opcheck: schema, fake kernel and autograd registration agree with the kernel."""
    x, W, b, A, B, s, p, d, groups, m = _conv_args(1, 2, 2, 1, 1, 3, 2, mask=True)
    torch.library.opcheck(op.default, (x, W, b, A, B, 0.5, s, p, d, groups, m, 0.25))


@pytest.mark.parametrize("dim,kernel", [(1, 3), (2, 1), (2, 3), (3, 2)])
def test_conv_delta_weight_is_the_adapter_as_one_convolution(dim, kernel):
    """Merging (groups == 1): conv(x, W + ΔW) equals lora_conv, and ΔW equals PEFT's get_delta_weight."""
    x, W, b, A, B, s, p, d, groups, _ = _conv_args(dim, 1, 2, 1, 1, kernel, 3)
    with torch.no_grad():
        merged = _CONVS[dim](x, W + conv_delta_weight(A, B, 0.7), b, s, p, d, 1)
        torch.testing.assert_close(merged, op(x, W, b, A, B, 0.7, s, p, d, 1))
        # PEFT's general formula (its 1x1 case is the same product)
        peft = _CONVS[dim](A.transpose(0, 1), B).transpose(0, 1) * 0.7
        torch.testing.assert_close(conv_delta_weight(A, B, 0.7), peft)


def test_lora_conv_adapters_in_their_own_dtype():
    """adapter_dtype=float32 on a bfloat16 layer: the adapter runs in float32, rounded back once (PEFT's order)."""
    x, W, b, A, B, s, p, d, groups, _ = _conv_args(2, 1, 1, 1, 1, 3, 2, dtype=torch.float32)
    xb, Wb, bb = x.detach().bfloat16(), W.detach().bfloat16(), b.detach().bfloat16()
    y = op(xb, Wb, bb, A, B, 0.5, s, p, d, 1)
    assert y.dtype == torch.bfloat16
    want = (torch.conv2d(xb, Wb, bb, s, p, d).float() + 0.5 * torch.conv2d(torch.conv2d(xb.float(), A, None, s, p, d), B))
    torch.testing.assert_close(y, want.bfloat16())
    y.float().sum().backward()
    assert A.grad.dtype == torch.float32 and B.grad is not None
