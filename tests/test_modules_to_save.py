"""PEFT's modules_to_save and trainable_token_indices in lorafx.

* modules_to_save: a classifier head (BERT's ``classifier``, LLaMA's ``score``) trains in full
  next to LoRA on attention; parity with PEFT (logits and every trainable gradient), the PEFT
  round trip both ways (PEFT's SEQ_CLS head included), only the adapters and the head train,
  the source model is never written, merge/unmerge/merge_and_unload/merged_state_dict keep the
  trained head, state_dict round trip;
* trainable_token_indices: some rows of a tiny LLaMA's input embedding train (lm_head untied,
  tied, or named itself); the same checks, and the row replacement equals an embedding of
  W.index_copy(0, idx, delta) for any ids (hypothesis).

Models are float64 so that equality is tight.
"""
import copy
import json

import pytest
import torch
from hypothesis import given, strategies as st

import lorafx
from lorafx.graph_utils import get_attr

peft = pytest.importorskip("peft")
T = pytest.importorskip("transformers")

DTYPE = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)
HEADS = {"bert": "classifier", "llama": "score"}


def _classifier(family):
    torch.manual_seed(0)
    if family == "bert":
        cfg = T.BertConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, max_position_embeddings=32, num_labels=3)
        return T.BertForSequenceClassification(cfg).to(DTYPE).eval()
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    return T.LlamaForSequenceClassification(cfg).to(DTYPE).eval()


def _llama(tie=False):
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tie,
                        pad_token_id=0)  # a trainable row is the padding row: it gets no gradient, as in PEFT
    return T.LlamaForCausalLM(cfg).to(DTYPE).eval()


def _ids(vocab, seed=5, tokens=()):
    x = torch.randint(1, vocab, (2, 7), generator=torch.Generator().manual_seed(seed))
    for i, t in enumerate(tokens):  # the trainable rows appear, some twice
        x[i % 2, i] = t
        x[(i + 1) % 2, 6 - i] = t
    return x


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def _assert_unchanged(model, before):
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k].detach(), v), f"the source model's {k} changed"
    assert all(p.grad is None for p in model.parameters()), "the source model got gradients"


def _randomize(params, seed, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def _copy_lora(pm, cm):
    peft_params = dict(pm.named_parameters())
    with torch.no_grad():
        for site, rec in cm.lora_records().items():
            for ab, path in (("A", rec.lora_A), ("B", rec.lora_B)):
                get_attr(cm, path).copy_(peft_params[f"base_model.model.{site}.lora_{ab}.default.weight"])


def _train_steps(cm, x, labels, steps=2):
    cm.train()
    opt = torch.optim.SGD(cm.parameters(), lr=0.5)
    for _ in range(steps):
        cm(input_ids=x, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    cm.eval()


def _check_merge_and_state(cm, source, x):
    """merge/unmerge/merge_and_unload/merged_state_dict equal the unmerged model; state_dict round-trips."""
    want = cm(input_ids=x).logits.detach()
    cm.merge()
    torch.testing.assert_close(cm(input_ids=x).logits, want, rtol=1e-9, atol=1e-9)
    merged_state = cm.state_dict()
    cm.unmerge()
    torch.testing.assert_close(cm(input_ids=x).logits, want, **TOL)
    assert merged_state.keys() == cm.state_dict().keys()
    for k, v in cm.state_dict().items():  # the state of a merged model is the unmerged one
        assert torch.equal(merged_state[k], v), k
    plain = cm.merge_and_unload()
    torch.testing.assert_close(plain(input_ids=x).logits, want, rtol=1e-9, atol=1e-9)
    fresh = copy.deepcopy(source)
    fresh.load_state_dict(cm.merged_state_dict(), strict=True)
    torch.testing.assert_close(fresh(input_ids=x).logits, want, rtol=1e-9, atol=1e-9)
    state = {k: v.clone() for k, v in cm.state_dict().items()}
    _randomize(cm.trainable_parameters().values(), seed=77)
    assert not torch.allclose(cm(input_ids=x).logits, want)
    cm.load_state_dict(state)
    torch.testing.assert_close(cm(input_ids=x).logits, want, **TOL)


# -- modules_to_save ------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["bert", pytest.param("llama", marks=pytest.mark.slow)])
def head_case(request):
    family = request.param
    head = HEADS[family]
    base = _classifier(family)
    targets = ["query", "value"] if family == "bert" else ["q_proj", "v_proj"]
    x = _ids(base.config.vocab_size)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets,
                                                                  modules_to_save=[head])).eval()
    _randomize([p for p in pm.parameters() if p.requires_grad], seed=1)
    cm = lorafx.compile(base, example_inputs=(x,), dynamic=False, r=2, alpha=4, target_modules=targets,
                        modules_to_save=[head]).eval()
    _copy_lora(pm, cm)
    with torch.no_grad():
        saved = pm.base_model.model.get_submodule(head).modules_to_save["default"]
        for name, p in saved.named_parameters():
            get_attr(cm, f"{head}.{name}").copy_(p)
    return family, head, base, pm, cm, x


def test_modules_to_save_parity_with_peft(head_case):
    family, head, base, pm, cm, x = head_case
    before = _snapshot(base)
    head_params = [f"{head}.{n}" for n, _ in base.get_submodule(head).named_parameters()]
    assert set(cm.trainable_parameters()) == {f"{s}.lora_{ab}" for s in cm.lora_records() for ab in "AB"} | \
        set(head_params)
    got, want = cm(input_ids=x).logits, pm(input_ids=x).logits
    torch.testing.assert_close(got, want, **TOL)
    w = torch.randn(got.shape, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    (got * w).sum().backward()
    (want * w).sum().backward()
    peft_params = dict(pm.named_parameters())
    for name in head_params:
        *_, pname = name.split(".")
        g_pm = peft_params[f"base_model.model.{head}.modules_to_save.default.{pname}"].grad
        assert g_pm.abs().max() > 0
        torch.testing.assert_close(cm.get_parameter(name).grad, g_pm, **TOL)
    for site in cm.lora_records():
        for ab in "AB":
            torch.testing.assert_close(cm.get_parameter(f"{site}.lora_{ab}").grad,
                                       peft_params[f"base_model.model.{site}.lora_{ab}.default.weight"].grad, **TOL)
    cm.zero_grad(set_to_none=True)
    pm.zero_grad(set_to_none=True)
    _assert_unchanged(base, before)


def test_modules_to_save_round_trips_with_peft(head_case, tmp_path):
    family, head, base, pm, cm, x = head_case
    want = pm(input_ids=x).logits.detach()
    cm.save_adapter(str(tmp_path / "lorafx"))
    config = json.loads((tmp_path / "lorafx" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == [head]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lorafx")).eval()
    torch.testing.assert_close(loaded(input_ids=x).logits, want, **TOL)

    pm.save_pretrained(str(tmp_path / "peft"))
    back = lorafx.load_adapter(base, str(tmp_path / "peft"), example_inputs=(x,), dynamic=False).eval()
    torch.testing.assert_close(back(input_ids=x).logits, want, **TOL)
    # into an existing compiled model, merged or not
    _randomize(back.trainable_parameters().values(), seed=9)
    back.merge()
    back.load_adapter(str(tmp_path / "peft"))
    torch.testing.assert_close(back(input_ids=x).logits, want, rtol=1e-9, atol=1e-9)


def test_peft_seq_cls_adapter_loads_with_its_head(tmp_path):
    """PEFT's task_type="SEQ_CLS" lists modules_to_save=["classifier", "score"] itself and saves the
    head that exists: lorafx.load_adapter trains and loads it (it was refused before)."""
    base = _classifier("bert")
    x = _ids(base.config.vocab_size)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["query"],
                                                                  task_type="SEQ_CLS")).eval()
    _randomize([p for p in pm.parameters() if p.requires_grad], seed=4)
    pm.save_pretrained(str(tmp_path))
    assert set(json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]) == {"classifier", "score"}
    cm = lorafx.load_adapter(base, str(tmp_path), example_inputs=(x,), dynamic=False).eval()
    assert cm.options["modules_to_save"] == ["classifier"]
    torch.testing.assert_close(cm(input_ids=x).logits, pm(input_ids=x).logits, **TOL)


@pytest.mark.slow
def test_modules_to_save_trains_without_touching_the_source():
    base = _classifier("bert")
    before = _snapshot(base)
    x = _ids(base.config.vocab_size)
    cm = lorafx.compile(base, example_inputs=(x,), dynamic=False, r=2, target_modules=["query", "value"],
                        modules_to_save=["classifier"])
    trainable = cm.trainable_parameters()
    assert set(trainable) == {"bert.encoder.layer.0.attention.self.query.lora_A",
                              "bert.encoder.layer.0.attention.self.query.lora_B",
                              "bert.encoder.layer.0.attention.self.value.lora_A",
                              "bert.encoder.layer.0.attention.self.value.lora_B", "classifier.weight", "classifier.bias"}
    assert cm.report().trainable_params == sum(p.numel() for p in trainable.values())
    head = cm.classifier.weight.detach().clone()
    _train_steps(cm, x, torch.tensor([0, 2]))
    assert not torch.equal(cm.classifier.weight, head), "the head should train"
    _assert_unchanged(base, before)
    _check_merge_and_state(cm, base, x)
    assert torch.equal(cm.merged_state_dict()["classifier.weight"], cm.classifier.weight.detach())
    _assert_unchanged(base, before)


def test_print_trainable_parameters_counts_the_head(capsys):
    base = _classifier("bert")
    cm = lorafx.compile(base, example_inputs=(_ids(64),), dynamic=False, r=2, target_modules=["query"],
                        modules_to_save=["classifier"])
    cm.print_trainable_parameters()
    lora = sum(get_attr(cm, p).numel() for r in cm.lora_records().values() for p in (r.lora_A, r.lora_B))
    head = sum(p.numel() for p in base.classifier.parameters())
    assert f"trainable params: {lora + head:,} ||" in capsys.readouterr().out


def test_adapter_sites_inside_modules_to_save_get_no_adapter():
    """PEFT: modules_to_save wins over target_modules (the head trains in full, unadapted)."""
    base = _classifier("bert")
    x = _ids(64)
    cm = lorafx.compile(base, example_inputs=(x,), dynamic=False, r=2, target_modules=["query", "classifier"],
                        modules_to_save=["classifier"])
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["query", "classifier"],
                                                                  modules_to_save=["classifier"]))
    peft_sites = {n[len("base_model.model."):-len(".lora_A.default.weight")]
                  for n, _ in pm.named_parameters() if n.endswith(".lora_A.default.weight")}
    assert set(cm.lora_records()) == peft_sites == {"bert.encoder.layer.0.attention.self.query"}
    with pytest.raises(ValueError, match="matched no linear layer"):
        lorafx.compile(base, example_inputs=(x,), dynamic=False, target_modules=["classifier"],
                       modules_to_save=["classifier"])


@pytest.mark.parametrize("value,exc,match", [
    (["head"], ValueError, "no module with parameters .* ending with 'head'"),
    ("classifier", TypeError, "list of module names"),
    ([], ValueError, "non-empty"),
])
def test_bad_modules_to_save_are_refused(value, exc, match):
    with pytest.raises(exc, match=match):
        lorafx.compile(_classifier("bert"), example_inputs=(_ids(64),), dynamic=False, target_modules=["query"],
                       modules_to_save=value)


def test_modules_to_save_with_tied_weights_is_refused():
    with pytest.raises(ValueError, match="shares a parameter .*tied weights"):
        lorafx.compile(_llama(tie=True), example_inputs=(_ids(48),), dynamic=False, target_modules=["q_proj"],
                       modules_to_save=["lm_head"])


# -- trainable_token_indices -------------------------------------------------------------------------

TOKENS = [0, 5, 11]
TOKEN_CASES = {  # name -> (tie_word_embeddings, trainable_token_indices)
    "list": (False, TOKENS),
    "tied": (True, TOKENS),
    "dict-lm_head": (False, {"embed_tokens": TOKENS, "lm_head": [3, 5]}),
}


@pytest.fixture(scope="module", params=["list", pytest.param("tied", marks=pytest.mark.slow),
                                        pytest.param("dict-lm_head", marks=pytest.mark.slow)])
def token_case(request):
    tie, indices = TOKEN_CASES[request.param]
    base = _llama(tie)
    x = _ids(48, tokens=TOKENS + [3])
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                                  trainable_token_indices=indices)).eval()
    _randomize([p for p in pm.parameters() if p.requires_grad], seed=2)
    cm = lorafx.compile(base, example_inputs=(x,), dynamic=False, r=2, alpha=4, target_modules=["q_proj"],
                        trainable_token_indices=indices).eval()
    _copy_lora(pm, cm)
    peft_params = dict(pm.named_parameters())
    with torch.no_grad():
        for name in cm.trainable_parameters():
            if name.endswith("trainable_tokens_delta"):
                module = name[:-len(".trainable_tokens_delta")]
                get_attr(cm, name).copy_(
                    peft_params[f"base_model.model.{module}.token_adapter.trainable_tokens_delta.default"])
    return request.param, base, pm, cm, x


def _delta_names(cm):
    return sorted(n for n in cm.trainable_parameters() if n.endswith("trainable_tokens_delta"))


def test_trainable_tokens_parity_with_peft(token_case):
    name, base, pm, cm, x = token_case
    before = _snapshot(base)
    owners = ["model.embed_tokens"] + (["lm_head"] if name == "dict-lm_head" else [])
    assert _delta_names(cm) == sorted(f"{m}.trainable_tokens_delta" for m in owners)
    got, want = cm(input_ids=x).logits, pm(input_ids=x).logits
    torch.testing.assert_close(got, want, **TOL)
    with pm.disable_adapter(), torch.no_grad():
        assert (want - pm(input_ids=x).logits).abs().max() > 1e-3
    w = torch.randn(got.shape, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    (got * w).sum().backward()
    (want * w).sum().backward()
    peft_params = dict(pm.named_parameters())
    for m in owners:
        g_pm = peft_params[f"base_model.model.{m}.token_adapter.trainable_tokens_delta.default"].grad
        assert g_pm.abs().max() > 0
        torch.testing.assert_close(cm.get_parameter(f"{m}.trainable_tokens_delta").grad, g_pm, **TOL)
    for site in cm.lora_records():
        for ab in "AB":
            torch.testing.assert_close(cm.get_parameter(f"{site}.lora_{ab}").grad,
                                       peft_params[f"base_model.model.{site}.lora_{ab}.default.weight"].grad, **TOL)
    cm.zero_grad(set_to_none=True)
    pm.zero_grad(set_to_none=True)
    _assert_unchanged(base, before)


def test_trainable_tokens_round_trip_with_peft(token_case, tmp_path):
    name, base, pm, cm, x = token_case
    want = pm(input_ids=x).logits.detach()
    cm.save_adapter(str(tmp_path / "lorafx"))
    config = json.loads((tmp_path / "lorafx" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == TOKEN_CASES[name][1]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lorafx")).eval()
    torch.testing.assert_close(loaded(input_ids=x).logits, want, **TOL)

    pm.save_pretrained(str(tmp_path / "peft"))
    back = lorafx.load_adapter(base, str(tmp_path / "peft"), example_inputs=(x,), dynamic=False).eval()
    torch.testing.assert_close(back(input_ids=x).logits, want, **TOL)
    _randomize(back.trainable_parameters().values(), seed=9)
    back.merge()
    back.load_adapter(str(tmp_path / "peft"))
    torch.testing.assert_close(back(input_ids=x).logits, want, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("tie", [False, True])
def test_trainable_tokens_train_without_touching_the_source(tie):
    base = _llama(tie)
    before = _snapshot(base)
    x = _ids(48, tokens=TOKENS)
    cm = lorafx.compile(base, example_inputs=(x,), dynamic=False, r=2, target_modules=["q_proj"],
                        trainable_token_indices=TOKENS)
    assert set(cm.trainable_parameters()) == {"model.embed_tokens.trainable_tokens_delta",
                                              "model.layers.0.self_attn.q_proj.lora_A",
                                              "model.layers.0.self_attn.q_proj.lora_B"}
    delta = cm.get_parameter("model.embed_tokens.trainable_tokens_delta")
    torch.testing.assert_close(delta, base.model.embed_tokens.weight[TOKENS], rtol=0, atol=0)  # PEFT's init
    torch.testing.assert_close(cm(input_ids=x).logits, base(input_ids=x).logits, **TOL)  # identity at init
    start = delta.detach().clone()
    _train_steps(cm, x, x)
    assert not torch.equal(delta, start), "the rows should train"
    _assert_unchanged(base, before)
    _check_merge_and_state(cm, base, x)
    merged = cm.merged_state_dict()
    assert torch.equal(merged["model.embed_tokens.weight"][TOKENS], delta.detach())
    if tie:
        assert torch.equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"])
    _assert_unchanged(base, before)


@given(st.lists(st.integers(0, 47), min_size=1, max_size=20), st.lists(st.integers(0, 47), min_size=1,
                                                                       max_size=6, unique=True),
       st.sampled_from([-1, 0, 7]))
def test_row_replacement_equals_embedding_of_replaced_weight(ids, rows, pad):
    """The rewrite (lookup, where) computes embedding(W.index_copy(0, idx, delta), ids, padding_idx) and its
    gradient (none for the padding row)."""
    import torch.fx
    from lorafx.passes.trainable_tokens import TokensRecord, apply_tokens

    gen = torch.Generator().manual_seed(len(ids) + 7 * len(rows))
    root = torch.nn.Module()
    root.register_buffer("W", torch.randn(48, 5, generator=gen, dtype=DTYPE))
    g = torch.fx.Graph()
    x = g.placeholder("x")
    base = g.call_function(torch.ops.aten.embedding.default, (g.get_attr("W"), x, pad))
    g.output(base)
    gm = root = torch.fx.GraphModule(root, g)
    root.delta = torch.nn.Parameter(torch.randn(len(rows), 5, generator=gen, dtype=DTYPE))
    lookup = torch.full((48,), -1, dtype=torch.long)
    lookup[rows] = torch.arange(len(rows))
    root.register_buffer("lookup", lookup)
    root.register_buffer("idx", torch.tensor(rows))
    apply_tokens(gm, base, TokensRecord(module="", weight="W", delta="delta", indices="idx", lookup="lookup",
                                        tokens=tuple(rows), layer="Embedding"))
    gm.recompile()
    t = torch.tensor(ids)
    got = gm(t)
    delta_ref = root.delta.detach().clone().requires_grad_(True)
    want = torch.nn.functional.embedding(t, root.W.index_copy(0, torch.tensor(rows), delta_ref),
                                         padding_idx=None if pad < 0 else pad)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    w = torch.randn(got.shape, generator=gen, dtype=DTYPE)
    (got * w).sum().backward()
    (want * w).sum().backward()
    torch.testing.assert_close(root.delta.grad, delta_ref.grad, **TOL)


@pytest.mark.parametrize("value,exc,match", [
    ([0, 99], ValueError, r"out of range .* 48 rows"),
    ([1, 1], ValueError, "repeats token ids"),
    ({"nothing": [1]}, ValueError, "no embedding or linear layer .* ending with it"),
    ([], ValueError, "non-empty list"),
    ("0,1", TypeError, "list of token ids"),
])
def test_bad_trainable_token_indices_are_refused(value, exc, match):
    with pytest.raises(exc, match=match):
        lorafx.compile(_llama(), example_inputs=(_ids(48),), dynamic=False, target_modules=["q_proj"],
                       trainable_token_indices=value)


@pytest.mark.slow
def test_adapters_that_do_not_fit_are_refused(tmp_path):
    """Rows named in the config but not saved, and a head or rows the model was not compiled
    to train: refused on both paths, naming the option."""
    base = _llama()
    x = _ids(48)
    cm = lorafx.compile(base, example_inputs=(x,), dynamic=False, r=2, target_modules=["q_proj"])
    cm.save_adapter(str(tmp_path / "plain"))
    path = tmp_path / "plain" / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "trainable_token_indices": [1, 2]}))
    for load in (lambda d: lorafx.load_adapter(base, d, example_inputs=(x,), dynamic=False), cm.load_adapter):
        with pytest.raises(ValueError, match="trainable_token_indices"):
            load(str(tmp_path / "plain"))
    tokens = lorafx.compile(base, example_inputs=(x,), dynamic=False, r=2, target_modules=["q_proj"],
                            trainable_token_indices=[1, 2])
    tokens.save_adapter(str(tmp_path / "tokens"))
    with pytest.raises(ValueError, match="trainable_token_indices"):
        cm.load_adapter(str(tmp_path / "tokens"))  # compiled without the rows
    other = lorafx.compile(base, example_inputs=(x,), dynamic=False, r=2, target_modules=["q_proj"],
                           trainable_token_indices=[1, 3])
    with pytest.raises(ValueError, match=r"trains rows \[1, 2\] .* rows \[1, 3\]"):
        other.load_adapter(str(tmp_path / "tokens"))
