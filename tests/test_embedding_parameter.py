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


def test_lora_embedding_gradcheck():
    ids, W, A, B = _emb_args(7, 4, 3, (2, 3), 0)
    assert torch.autograd.gradcheck(lambda W, A, B: emb_op(ids, W, A, B, 0.7), (W, A, B))


@pytest.mark.slow
def test_opcheck_both_ops():
    """Schema, fake kernel, autograd registration and AOT dispatch (torch.library.opcheck)."""
    ids, W, A, B = _emb_args(7, 4, 3, (2, 3), 0)
    torch.library.opcheck(emb_op.default, (ids, W, A, B, 0.7, 2))
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(param_op.default, (mk(5, 4), mk(3, 4), mk(5, 3), 0.3))


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


def test_lora_parameter_gradcheck_and_flops():
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
    W, A, B = mk(5, 4), mk(3, 4), mk(5, 3)
    assert torch.autograd.gradcheck(lambda W, A, B: param_op(W, A, B, 0.3), (W, A, B))
    with FlopCounterMode(display=False) as fc:
        param_op(W.detach(), A, B, 0.3).sum().backward()
    assert fc.get_total_flops() == 3 * 2 * 5 * 4 * 3


# -- models -----------------------------------------------------------------------------------------

peft = pytest.importorskip("peft")
DTYPE = torch.float64


class UsesParameter(torch.nn.Module):
    """A bare parameter used directly, stored (in, out): y = x @ W (PEFT's target_parameters case)."""

    def __init__(self, i, o):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(i, o) * 0.3)

    def forward(self, x):
        return x @ self.weight


class EmbModel(torch.nn.Module):
    """An embedding (with a padding row), a linear and a parameter used in a matmul."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(30, 8, padding_idx=0)
        self.lin = torch.nn.Linear(8, 6)
        self.proj = UsesParameter(6, 5)

    def forward(self, ids):
        return self.proj(torch.relu(self.lin(self.emb(ids))))


class MLP(torch.nn.Module):
    """PEFT's "MLP 2 using nn.Parameter" row: lin0 by target_modules, lin1's weight by target_parameters."""

    def __init__(self):
        super().__init__()
        self.lin0 = torch.nn.Linear(10, 20)
        self.lin1 = torch.nn.Linear(20, 2)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


class EmbConv1D(torch.nn.Module):
    """PEFT's "Embedding + transformers Conv1D" model: an embedding, GPT-2's Conv1D, a linear."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.emb = torch.nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)
        self.lin0 = torch.nn.Linear(10, 2)

    def forward(self, ids):
        return self.lin0(torch.relu(self.conv1d(self.emb(ids))).flatten(1))


def _model(name):
    torch.manual_seed(0)
    return {"emb": EmbModel, "mlp": MLP, "embconv1d": EmbConv1D}[name]().to(DTYPE)


def _input(name):
    g = torch.Generator().manual_seed(3)
    if name == "emb":
        return torch.randint(0, 30, (3, 7), generator=g)
    if name == "embconv1d":
        return torch.randint(0, 100, (4, 10), generator=g)
    return torch.randn(4, 10, generator=g, dtype=DTYPE)


# name -> (model, PEFT LoraConfig fields; the same go to lorafx.compile, lora_alpha as alpha)
CASES = {
    "emb+lin+param": ("emb", dict(r=4, lora_alpha=8, target_modules=["emb", "lin"], target_parameters=["proj.weight"],
                                  rank_pattern={"proj.weight": 2})),
    "emb+lin": ("emb", dict(r=3, lora_alpha=5, target_modules=["emb", "lin"])),
    "param-only": ("emb", dict(r=2, lora_alpha=4, target_modules=[], target_parameters=["proj.weight"])),
    "embconv1d": ("embconv1d", dict(r=8, lora_alpha=8, target_modules=["emb", "conv1d"])),  # r=8 > Conv1D's 1
    "mlp-lin0+lin1.weight": ("mlp", dict(r=4, lora_alpha=8, target_modules=["lin0"], target_parameters=["lin1.weight"])),
}


def _compile(name, **extra):
    model_name, fields = CASES[name]
    options = {("alpha" if k == "lora_alpha" else k): v for k, v in fields.items()}
    return lorafx.compile(_model(model_name), example_inputs=(_input(model_name),), **{
        "dynamic": False, "seed": 0, **options, **extra})


def _peft(name):
    import copy
    model_name, fields = CASES[name]
    model = copy.deepcopy(_model(model_name))
    return peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **fields))


def _adapter_paths(cm):
    """{PEFT key without the adapter name: lorafx attribute path}."""
    from lorafx.adapter_io import peft_keys
    return peft_keys(cm.lora_records())


def _peft_param(pm, key):
    """PEFT's parameter for a key such as ``emb.lora_embedding_A`` / ``lin.lora_A.weight``."""
    site, rest = key.split(".lora_", 1)
    name = "lora_" + rest
    full = dict(pm.named_parameters())
    for suffix in (f"{name}.default", f"{name.replace('.weight', '')}.default.weight"):
        if f"base_model.model.{site}.{suffix}" in full:
            return full[f"base_model.model.{site}.{suffix}"]
    raise KeyError(key)


def _copy_from_peft(cm, pm):
    from lorafx.graph_utils import get_attr
    with torch.no_grad():
        for key, path in _adapter_paths(cm).items():
            get_attr(cm, path).copy_(_peft_param(pm, key))


# -- compile, init, training, merging -----------------------------------------------------------------

def test_sites_by_kind_identity_at_init_and_only_adapters_train():
    """Each target gets its kind; PEFT's inits (embedding A = 0, B ~ N(0, 1); parameter A kaiming,
    B = 0) make the model its base at init; only A and B train."""
    cm = _compile("emb+lin+param")
    recs = cm.lora_records()
    assert {s: (r.kind, r.layer) for s, r in recs.items()} == {
        "emb": ("lora_embedding", "Embedding"), "lin": ("lora_linear", "Linear"),
        "proj": ("lora_parameter", "Parameter")}
    assert recs["proj"].r == 2 and recs["proj"].weight == "proj.weight"  # rank_pattern on the parameter's name
    assert "(Embedding 1, Linear 1, Parameter 1)" in str(cm.report())
    A, B = cm.emb.lora_A, cm.emb.lora_B
    assert A.shape == (4, 30) and B.shape == (8, 4) and (A == 0).all() and 0.6 < B.std().item() < 1.4
    assert cm.proj.lora_A.shape == (2, 5) and cm.proj.lora_B.shape == (6, 2) and (cm.proj.lora_B == 0).all()
    x = _input("emb")
    torch.testing.assert_close(cm(x), _model("emb")(x))
    assert sorted(n for n, p in cm.named_parameters() if p.requires_grad) == [
        "emb.lora_A", "emb.lora_B", "lin.lora_A", "lin.lora_B", "proj.lora_A", "proj.lora_B"]
    cm(x).sum().backward()
    assert all(p.grad is None for n, p in cm.named_parameters() if not p.requires_grad)
    assert cm.emb.lora_A.grad.abs().sum() > 0 and (cm.emb.lora_A.grad[:, 0] == 0).all()  # padding row: no grad


@pytest.mark.parametrize("name", ["emb+lin+param", "mlp-lin0+lin1.weight"])
def test_merge_unmerge_and_unload_equal_the_unmerged_model(name):
    cm = _compile(name)
    _copy_from_peft(cm, _peft(name))  # non-zero A and B
    x = _input(CASES[name][0])
    cm.eval()
    with torch.no_grad():
        y = cm(x)
        cm.merge()
        torch.testing.assert_close(cm(x), y)
        cm.unmerge()
        torch.testing.assert_close(cm(x), y)
        state = cm.merged_state_dict()
        base = _model(CASES[name][0])
        assert set(state) == set(base.state_dict())
        base.load_state_dict(state)
        torch.testing.assert_close(base(x), y)
        torch.testing.assert_close(cm.merge_and_unload()(x), y)


# -- PEFT parity and the PEFT format both ways ----------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_peft_parity_outputs_and_adapter_gradients(name):
    """With A and B copied from PEFT (init_lora_weights=False: both non-zero), outputs and the
    gradients of every adapter tensor equal PEFT's."""
    pm, cm = _peft(name), _compile(name)
    _copy_from_peft(cm, pm)
    x = _input(CASES[name][0])
    y, ref = cm(x), pm(x)
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref.backward(dy)
    from lorafx.graph_utils import get_attr
    for key, path in _adapter_paths(cm).items():
        torch.testing.assert_close(get_attr(cm, path).grad, _peft_param(pm, key).grad)


@pytest.mark.parametrize("name", list(CASES))
def test_save_adapter_loads_in_peft(name, tmp_path):
    import json
    cm = _compile(name)
    _copy_from_peft(cm, _peft(name))
    cm.eval()
    x = _input(CASES[name][0])
    cm.save_adapter(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    fields = CASES[name][1]
    assert config["target_parameters"] == fields.get("target_parameters")
    assert sorted(config["target_modules"]) == sorted(fields["target_modules"])
    pm = peft.PeftModel.from_pretrained(_model(CASES[name][0]), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(x), cm(x))


@pytest.mark.parametrize("name", list(CASES))
def test_peft_saved_adapter_loads_in_lorafx(name, tmp_path):
    pm = _peft(name).eval()
    pm.save_pretrained(str(tmp_path))
    model_name = CASES[name][0]
    x = _input(model_name)
    cm = lorafx.load_adapter(_model(model_name), str(tmp_path), example_inputs=(x,), dynamic=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(cm(x), pm(x))
    kinds = {r.kind for r in cm.lora_records().values()}
    assert ("lora_parameter" in kinds) == bool(CASES[name][1].get("target_parameters"))


# -- what is refused, and the passes keyed on linear adapters --------------------------------------------

class _Wrap(torch.nn.Module):
    def __init__(self, inner, extra=None):
        super().__init__()
        self.inner = inner
        if extra is not None:
            self.extra = extra

    def forward(self, x):
        return self.inner(x)


class _Experts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(2, 4, 3))

    def forward(self, x):
        return (x @ self.w).sum(0)


class _ReadsOthers(torch.nn.Module):
    """proj.weight is also read by the parent (outside the module holding it)."""

    def __init__(self):
        super().__init__()
        self.proj = UsesParameter(4, 4)

    def forward(self, x):
        return self.proj(x) + x @ self.proj.weight.t()


class _TopLevel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 3))

    def forward(self, x):
        return x @ self.weight


@pytest.mark.parametrize("model, x, options, match", [
    (lambda: _Wrap(torch.nn.Embedding(10, 4, max_norm=1.0)), torch.tensor([[1, 2]]),
     dict(target_modules=["inner"]), "inner is an nn.Embedding with max_norm set"),
    (lambda: _Wrap(torch.nn.Embedding(10, 4, scale_grad_by_freq=True)), torch.tensor([[1, 2]]),
     dict(target_modules=["inner"]), "scale_grad_by_freq=True"),
    (lambda: _Wrap(_Experts()), torch.randn(3, 4), dict(target_modules=[], target_parameters=["w"]),
     r"names 'inner.w' of shape \(2, 4, 3\); lorafx adapts 2-d parameters only"),
    (lambda: _TopLevel(), torch.randn(2, 4), dict(target_modules=[], target_parameters=["weight"]),
     "a parameter of the top-level model"),
    (lambda: _ReadsOthers(), torch.randn(2, 4), dict(target_modules=[], target_parameters=["proj.weight"]),
     "is also read outside 'proj'"),
    (lambda: _model("emb"), _input("emb"), dict(target_modules=[], target_parameters=["nothing.weight"]),
     r"matched no parameter .*Parameters of this model: emb.weight"),
    (lambda: _model("emb"), _input("emb"), dict(target_modules=["lin"], target_parameters=["lin.weight"]),
     "lin.weight is named by target_parameters and its module 'lin' .* by target_modules"),
    (lambda: _model("emb"), _input("emb"), dict(target_modules=[], target_parameters=["proj.weight"], dropout=0.1),
     "dropout=0.1 cannot apply to target_parameters"),
    (lambda: _model("emb"), _input("emb"), dict(target_modules=["emb", "lin"], target="cim"),
     "lora_embedding adapter .* has no compute-in-memory lowering"),
])
def test_refused_with_the_reason(model, x, options, match):
    with pytest.raises(ValueError, match=match):
        lorafx.compile(model(), example_inputs=(x,), dynamic=False, **options)


def test_target_parameters_must_be_a_list():
    with pytest.raises(TypeError, match="target_parameters must be a list of parameter names"):
        lorafx.compile(_model("emb"), example_inputs=(_input("emb"),), target_parameters="proj.weight")


def test_rank_above_the_embedding_width_is_accepted_with_the_warning():
    from conftest import Warnings
    with Warnings() as records:
        cm = _compile("emb+lin", r=16, rank_pattern={})
    assert cm.lora_records()["emb"].r == 16 and cm.emb.lora_B.shape == (8, 16)
    assert any("rank above min(in, out)" in r.getMessage() for r in records)


def test_linear_passes_leave_the_new_kinds_alone():
    """SelectSchedule, RecomputeInputs, FuseSiblings and FoldLoRAIntoBase rewrite lora_linear nodes
    only; the embedding and parameter nodes keep their ops and get a cost."""
    from lorafx.meta import CostRecord, get_record
    cm = _compile("emb+lin+param", fold_a=True)
    g = cm.graph_module.graph
    emb = [n for n in g.nodes if n.target is torch.ops.lorafx.lora_embedding.default]
    par = [n for n in g.nodes if n.target is torch.ops.lorafx.lora_parameter.default]
    assert len(emb) == 1 and len(par) == 1
    assert get_record(emb[0], CostRecord) is not None and get_record(par[0], CostRecord) is not None


class _EmbNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 8)
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.emb(x))


def test_an_embedding_is_adaptable_a_norm_beside_it_is_still_refused():
    x = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"'norm' \(LayerNorm\).*nothing was compiled"):
        lorafx.compile(_EmbNorm(), example_inputs=(x,), dynamic=False, target_modules=["emb", "norm"])
    cm = lorafx.compile(_EmbNorm(), example_inputs=(x,), dynamic=False, target_modules=["emb"])
    assert {r.kind for r in cm.lora_records().values()} == {"lora_embedding"}


@pytest.mark.slow
def test_llama_embed_tokens_from_peft_with_its_saved_table(tmp_path):
    """PEFT saves the whole embedding table beside an embed_tokens adapter: lorafx loads the adapter
    when that table is the model's, matching PEFT's logits, and refuses it when it differs."""
    import copy

    from conftest import _tiny, ids
    from safetensors.torch import load_file, save_file
    model = _tiny("llama").to(DTYPE)
    x = ids(2, 8, 96)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)).eval()
    pm.save_pretrained(str(tmp_path))
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.base_layer.weight" in state
    cm = lorafx.load_adapter(copy.deepcopy(model), str(tmp_path), example_inputs=(x,), dynamic=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(cm(input_ids=x).logits, pm(input_ids=x).logits)
    state["base_model.model.model.embed_tokens.base_layer.weight"][3] += 1
    save_file(state, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="also holds the embedding table .* differs from this model's"):
        lorafx.load_adapter(copy.deepcopy(model), str(tmp_path), example_inputs=(x,), dynamic=False)


def test_dynamic_shapes_match_peft():
    """Captured with dynamic batch and sequence: other shapes run the same graph, equal to PEFT."""
    cm, pm = _compile("emb+lin+param", dynamic=True), _peft("emb+lin+param")
    _copy_from_peft(cm, pm)
    for shape in [(5, 3), (1, 11)]:
        x = torch.randint(0, 30, shape, generator=torch.Generator().manual_seed(shape[1]))
        torch.testing.assert_close(cm(x), pm(x))


def test_target_parameters_alone_adapts_only_the_parameters():
    """PEFT's default target_modules=None: with target_parameters and no target_modules, no
    module is adapted (not all-linear)."""
    model = _model("emb")
    cm = lorafx.compile(model, example_inputs=(_input("emb"),), dynamic=False, seed=0, r=2,
                        target_parameters=["proj.weight"])
    assert {rec.layer for rec in cm.lora_records().values()} == {"Parameter"}
    assert list(cm.report().sites_by_layer) == ["Parameter"]
    plain = lorafx.compile(_model("emb"), example_inputs=(_input("emb"),), dynamic=False, seed=0, r=2)
    assert {rec.layer for rec in plain.lora_records().values()} == {"Linear"}  # no target_parameters: all-linear
