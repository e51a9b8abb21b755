"""LoRA on nn.Embedding (lora_embedding) and on bare parameters (lora_parameter, PEFT's target_parameters)."""
import pytest
import torch
from hypothesis import given, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import lorafx  # noqa: F401
from lorafx.dialect.embedding import lora_embedding_reference
from lorafx.dialect.parameter import lora_parameter_reference

emb_op = torch.ops.lorafx.lora_embedding
param_op = torch.ops.lorafx.lora_parameter


def _emb_args(num, dim, r, shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype, requires_grad=True)
    ids = torch.randint(0, num, shape, generator=g)
    return ids, mk(num, dim), mk(r, num), mk(dim, r)


# -- the ops ----------------------------------------------------------------------------------------

@given(num=st.integers(1, 12), dim=st.integers(1, 7), r=st.integers(1, 40), tokens=st.integers(1, 9),
       batch=st.integers(1, 3), pad=st.booleans(), seed=st.integers(0, 100))
def test_lora_embedding_matches_reference(num, dim, r, tokens, batch, pad, seed):
    """Output and the W, A, B gradients equal PEFT's plain-autograd forward (F.embedding into Aᵀ,
    then Bᵀ), padding_idx included (no gradient into the padding row); r from 32 takes the
    r-column form of dy B."""
    ids, W, A, B = _emb_args(num, dim, r, (batch, tokens), seed)
    padding_idx = int(ids[0, 0]) if pad else -1
    y = emb_op(ids, W, A, B, 0.7, padding_idx)
    ref = lora_embedding_reference(ids, W, A, B, 0.7, padding_idx)
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, (W, A, B), dy), torch.autograd.grad(ref, (W, A, B), dy)):
        torch.testing.assert_close(got, want)


def test_lora_embedding_gradcheck_and_opcheck():
    ids, W, A, B = _emb_args(7, 4, 3, (2, 3), 0)
    assert torch.autograd.gradcheck(lambda W, A, B: emb_op(ids, W, A, B, 0.7), (W, A, B))
    torch.library.opcheck(emb_op.default, (ids, W, A, B, 0.7, 2))


def test_lora_embedding_dA_is_a_scatter_not_a_dense_table():
    """dA is an index_add into (r, num): no (num, dim) tensor is formed, and the products are
    the forward's (tokens, r) @ (r, dim) and the backward's two, 2·T·r·dim FLOPs each."""
    ids, W, A, B = _emb_args(50, 6, 3, (2, 4), 1, torch.float32)
    W = W.detach()
    with FlopCounterMode(display=False) as fc, _Shapes() as shapes:
        emb_op(ids, W, A, B, 0.5).sum().backward()
    unit = 2 * 8 * 6 * 3
    assert fc.get_total_flops() == 3 * unit
    assert (50, 6) not in shapes and (6, 50) not in shapes
    unused = [i for i in range(50) if i not in ids.flatten().tolist()]
    assert A.grad.shape == (3, 50) and (A.grad[:, unused] == 0).all()


class _Shapes(TorchDispatchMode):
    """The shapes of every tensor an aten op makes (as a set)."""

    def __enter__(self):
        self.shapes = set()
        super().__enter__()
        return self.shapes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


def test_lora_embedding_mixed_dtype_runs_the_adapter_in_its_dtype():
    ids, W, A, B = _emb_args(9, 4, 2, (3,), 2, torch.float32)
    y = emb_op(ids, W.detach().bfloat16(), A, B, 2.0)
    assert y.dtype == torch.bfloat16
    ref = (W.detach().bfloat16()[ids].float() + 2.0 * A.t()[ids] @ B.t()).bfloat16()
    torch.testing.assert_close(y, ref)
    y.float().sum().backward()
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32


@given(d0=st.integers(1, 9), d1=st.integers(1, 9), r=st.integers(1, 12), seed=st.integers(0, 100))
def test_lora_parameter_matches_reference(d0, d1, r, seed):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
    W, A, B = mk(d0, d1), mk(r, d1), mk(d0, r)
    y, ref = param_op(W, A, B, 0.3), lora_parameter_reference(W, A, B, 0.3)
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, (W, A, B), dy), torch.autograd.grad(ref, (W, A, B), dy)):
        torch.testing.assert_close(got, want)


def test_lora_parameter_gradcheck_opcheck_and_flops():
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
    W, A, B = mk(5, 4), mk(3, 4), mk(5, 3)
    assert torch.autograd.gradcheck(lambda W, A, B: param_op(W, A, B, 0.3), (W, A, B))
    torch.library.opcheck(param_op.default, (W, A, B, 0.3))
    with FlopCounterMode(display=False) as fc:
        param_op(W.detach(), A, B, 0.3).sum().backward()
    assert fc.get_total_flops() == 3 * 2 * 5 * 4 * 3
