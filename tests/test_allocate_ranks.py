"""Rank allocation from zero-cost proxies (passes/score_sites.py, passes/allocate_ranks.py)."""
import copy
import json
import os

import pytest
import torch
from hypothesis import given, settings

import lorafx
from lorafx.dialect import kind_of
from lorafx.passes import AllocateRanks
from lorafx.passes.allocate_ranks import allocate, candidate_sites, reference_budget
from lorafx.passes.score_sites import PROXIES, Candidate, score_sites
from lorafx.testing import assert_equivalent, models

from conftest import HF_FAMILIES, ids

CAUSAL = ["llama", "qwen2", "mistral", "gpt2", "opt"]


def _compile(model, **options):
    inputs = {"input_ids": ids(2, 8)}
    options.setdefault("seed", 0)
    return lorafx.compile(model, example_kwargs=inputs, **options)


@pytest.fixture(scope="module")
def llama_graph(tiny_model):
    inputs = {"input_ids": ids(2, 8)}
    return lorafx.capture(tiny_model("llama"), example_kwargs=inputs), inputs


def _allocate(llama_graph, seed=0, **options):
    """AllocateRanks then InsertLoRA on a copy of the captured tiny LLaMA: (graph module, info)."""
    from lorafx.passes import InsertLoRA
    gm, inputs = llama_graph
    gm = copy.deepcopy(gm)
    ctx = lorafx.CompileContext(example_kwargs=inputs, seed=seed)
    reports = lorafx.Pipeline([AllocateRanks(**options), InsertLoRA()])(gm, ctx).info["reports"]
    return gm, reports[0].info


def _allocation_info(cm):
    return next(r.info for r in cm.report().passes if r.name == "AllocateRanks")


def _adapted(cm):
    return {site: rec.r for site, rec in cm.lora_records().items()}


def _snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: p.grad for n, p in model.named_parameters()})


# -- budget accounting ---------------------------------------------------------------------------------

@pytest.mark.parametrize("proxy,allocation", [(p, "graded") for p in PROXIES] + [("snip", "topk"), ("random", "topk")])
def test_budget_is_never_exceeded_and_rank_zero_sites_get_no_adapter(llama_graph, proxy, allocation):
    budget = 3000
    gm, info = _allocate(llama_graph, rank_budget=budget, proxy=proxy, allocation=allocation)
    trainable = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    assert trainable == info["used"] <= budget
    ranks = info["ranks"]
    adapted = {rec.site: rec.r for node in gm.graph.nodes if kind_of(node) for rec in kind_of(node).adapters(node)}
    assert adapted == {site: r for site, r in ranks.items() if r > 0}
    names = {n for n, _ in gm.named_parameters()}
    for site, r in ranks.items():
        assert (f"{site}.lora_A" in names) == (r > 0)
    # PEFT's rank_pattern is emitted for the adapted sites
    assert sorted(info["rank_pattern"].values()) == sorted(r for r in ranks.values() if r > 0)


def test_graded_allocation_gives_graded_ranks_and_topk_a_fixed_rank(llama_graph):
    graded = _allocate(llama_graph, rank_budget=1.0, proxy="snip")[1]["ranks"]
    assert len({r for r in graded.values()}) >= 3, graded  # several distinct ranks, zero included
    assert 0 in graded.values()
    topk = _allocate(llama_graph, rank_budget=1.0, proxy="snip", allocation="topk", r=4)[1]["ranks"]
    assert set(topk.values()) <= {0, 4} and 4 in topk.values()


def test_float_budget_is_a_multiple_of_uniform_rank_8_on_the_allowed_linears(tiny_model):
    model = tiny_model("llama")
    cm = _compile(model, rank_budget=0.5, target_modules=["q_proj", "v_proj"])
    info = _allocation_info(cm)
    uniform8 = lorafx.compile(model, example_kwargs={"input_ids": ids(2, 8)}, r=8, target_modules=["q_proj", "v_proj"])
    assert info["budget"] == sum(p.numel() for p in uniform8.parameters() if p.requires_grad) // 2
    assert set(info["ranks"]) == set(uniform8.lora_records())


def test_allocate_respects_caps_budget_and_scores():
    sites = [Candidate("a", "linear", 4, 4), Candidate("b", "linear", 16, 16), Candidate("c", "linear", 16, 2)]
    ranks = allocate(sites, {"a": 1.0, "b": 10.0, "c": 0.0}, budget=400)
    assert ranks["c"] == 0  # no score, no rank
    assert ranks["a"] <= 4 and ranks["b"] <= 16  # capped at min(in, out)
    assert sum(r * s.params_per_rank for s, r in zip(sites, ranks.values())) <= 400
    assert ranks["b"] * 32 > ranks["a"] * 8  # the better site gets the larger share
    # the budget is filled as far as the caps and the unit sizes allow
    left = 400 - sum(r * s.params_per_rank for s, r in zip(sites, ranks.values()))
    assert left < 8 or ranks["a"] == 4
    assert allocate(sites, {"a": 1.0, "b": 2.0, "c": 3.0}, budget=36, allocation="topk", rank=2) == \
        {"a": 0, "b": 0, "c": 2}
    assert reference_budget(sites, 1.0) == 8 * (8 + 32 + 18)


# -- determinism, replay, side effects ------------------------------------------------------------------------

def test_scores_and_ranks_are_deterministic_with_a_seed(llama_graph):
    for proxy in ("snip", "random"):
        a = _allocate(llama_graph, rank_budget=1.0, proxy=proxy, seed=3)[1]
        b = _allocate(llama_graph, rank_budget=1.0, proxy=proxy, seed=3)[1]
        assert a["scores"] == b["scores"] and a["ranks"] == b["ranks"]
    c = _allocate(llama_graph, rank_budget=1.0, proxy="random", seed=4)[1]
    assert c["scores"] != a["scores"]


def test_a_new_call_signature_replays_the_allocation(tiny_model, monkeypatch):
    model = tiny_model("llama")
    cm = _compile(model, rank_budget=1.0, proxy="snip")
    before = _adapted(cm)
    import lorafx.passes.allocate_ranks as mod
    monkeypatch.setattr(mod, "score_sites", lambda *a, **k: pytest.fail("scored again on replay"))
    with torch.no_grad():
        cm(input_ids=ids(3, 5), attention_mask=torch.ones(3, 5, dtype=torch.long))  # a new call signature
    assert len(cm._variants) == 2
    for gm in cm._variants.values():
        ranks = {}
        for node in gm.graph.nodes:
            kind = kind_of(node)
            for rec in kind.adapters(node) if kind is not None else []:
                ranks[rec.site] = rec.r
        assert ranks == before


def test_scoring_changes_nothing_in_the_users_model(tiny_model):
    model = copy.deepcopy(tiny_model("llama")).train()
    hooks = (len(model._forward_hooks), len(model._forward_pre_hooks), len(model._backward_hooks))
    state, flags, grads = _snapshot(model)
    calibration = [{"input_ids": ids(2, 8, seed=s)} for s in range(3)]
    for proxy in ("snip", "synflow"):
        cm = _compile(model, rank_budget=1.0, proxy=proxy, calibration=calibration)
        for name, p in cm.named_parameters():
            assert p.grad is None, name
    after, flags_after, grads_after = _snapshot(model)
    assert flags_after == flags and all(g is None for g in grads_after.values())
    for k, v in state.items():
        assert torch.equal(after[k], v), k
    assert (len(model._forward_hooks), len(model._forward_pre_hooks), len(model._backward_hooks)) == hooks
    assert model.training


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_every_model_family(tiny_model, family):
    """Scoring linears and shortcut sites, allocation and the identity at init, on every family."""
    model = copy.deepcopy(tiny_model(family)).eval()  # eval: GPT-2's dropout off
    inputs = {"input_ids": ids(2, 8)}
    if family == "bert":
        inputs["labels"] = torch.tensor([0, 2])  # a classifier's loss needs its labels
    proxy = "synflow" if family == "minilm" else "snip"  # a bare encoder has no loss
    cm = lorafx.compile(model, example_kwargs=inputs, rank_budget=1.0, proxy=proxy, shortcuts=True, seed=0)
    info = _allocation_info(cm)
    assert 0 < info["used"] <= info["budget"] and info["adapted"] > 0
    shortcut_scores = [v for k, v in info["scores"].items() if k.startswith("shortcuts.")]
    assert len(shortcut_scores) >= 7 and all(v > 0 for v in shortcut_scores)  # probed through the graph
    assert all(v >= 0 for v in info["scores"].values()) and any(v > 0 for v in info["scores"].values())
    with torch.no_grad():
        out = cm(**inputs)
        ref = model(**inputs)
    torch.testing.assert_close(out[0], ref[0])  # B = 0: the identity at init


def test_causal_lm_without_labels_scores_the_next_token_loss(tiny_model):
    model = tiny_model("llama")
    batch = ids(2, 8)
    with_labels = lorafx.compile(model, example_kwargs={"input_ids": batch, "labels": batch.clone()},
                                 rank_budget=1.0, proxy="grad_norm", seed=0)
    without = _compile(model, rank_budget=1.0, proxy="grad_norm")
    a, b = _allocation_info(with_labels)["scores"], _allocation_info(without)["scores"]
    assert a.keys() == b.keys()
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-4), k


@settings(max_examples=8)
@given(models())
def test_allocation_keeps_the_identity_at_init(case):
    """Property: whatever the allocation, B = 0 keeps outputs and input gradients exact."""
    gm = lorafx.capture(case.model, example_kwargs=case.inputs)
    sites = candidate_sites(gm)
    budget = min(s.params_per_rank for s in sites) * 3
    cm = lorafx.compile(case.model, example_kwargs=case.inputs, rank_budget=budget, proxy="snip", seed=0,
                        score_loss=lambda out, batch: out.square().mean())
    assert sum(p.numel() for p in cm.parameters() if p.requires_grad) <= budget
    assert_equivalent(case.model, cm, case.inputs)


# -- errors -------------------------------------------------------------------------------------------

def test_bad_budgets_and_options_are_refused_before_anything_is_built(tiny_model):
    model = tiny_model("llama")
    state, flags, _ = _snapshot(model)
    for budget, kind in ((0, ValueError), (-5, ValueError), (-0.5, ValueError), (float("nan"), ValueError),
                         (True, TypeError), ("1000", TypeError)):
        with pytest.raises(kind, match="rank_budget"):
            _compile(model, rank_budget=budget)
    with pytest.raises(ValueError, match="single rank-1 adapter.*k_proj, needs 48.*rank_budget >= 48"):
        _compile(model, rank_budget=10)
    with pytest.raises(ValueError, match="unknown proxy 'snipp'"):
        _compile(model, rank_budget=1.0, proxy="snipp")
    with pytest.raises(ValueError, match="rank_budget and rank_pattern"):
        _compile(model, rank_budget=1.0, rank_pattern={"q_proj": 4})
    with pytest.raises(ValueError, match="only applies with rank_budget"):
        _compile(model, proxy="snip")
    after, flags_after, _ = _snapshot(model)
    assert flags_after == flags and all(torch.equal(after[k], v) for k, v in state.items())


def test_calibration_batches_of_the_wrong_shape_name_the_problem(tiny_model):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="calibration batch 1: input 'input_ids' has 1 dim"):
        _compile(model, rank_budget=1.0, calibration=[{"input_ids": ids(2, 8)}, {"input_ids": ids(1, 8)[0]}])
    with pytest.raises(ValueError, match=r"calibration batch 0 has input\(s\) \['pixel_values'\]"):
        _compile(model, rank_budget=1.0, calibration=[{"input_ids": ids(2, 8), "pixel_values": torch.ones(2)}])
    with pytest.raises(ValueError, match="yielded no batch"):
        _compile(model, rank_budget=1.0, calibration=[])


def test_a_model_without_a_loss_gets_an_error_saying_what_to_pass():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = (torch.randn(2, 8),)
    with pytest.raises(ValueError, match="needs a loss.*score_loss=lambda outputs, batch"):
        lorafx.compile(model, example_inputs=x, rank_budget=200)
    cm = lorafx.compile(model, example_inputs=x, rank_budget=200, score_loss=lambda out, batch: out.pow(2).sum())
    assert 0 < sum(p.numel() for p in cm.parameters() if p.requires_grad) <= 200
    cm = lorafx.compile(model, example_inputs=x, rank_budget=200, proxy="synflow")
    assert _allocation_info(cm)["used"] <= 200


def test_calibration_labels_not_captured_are_used_for_the_causal_loss(tiny_model):
    model = tiny_model("llama")
    batch = ids(2, 8)
    masked = batch.clone()
    masked[:, :4] = -100
    a = _allocation_info(_compile(model, rank_budget=1.0, proxy="grad_norm",
                                  calibration=[{"input_ids": batch, "labels": masked}]))["scores"]
    b = _allocation_info(_compile(model, rank_budget=1.0, proxy="grad_norm",
                                  calibration=[{"input_ids": batch}]))["scores"]
    assert a != b  # the labels' -100 mask changed the loss


# -- reporting and saving -------------------------------------------------------------------------------------

def test_report_cli_and_saved_rank_pattern(tiny_model, tmp_path):
    model = tiny_model("llama")
    cm = _compile(model, rank_budget=1.0, proxy="fisher")
    text = str(cm.report())
    assert "proxy=fisher graded: budget" in text and "score" in text and "rank" in text
    cm.save_adapter(str(tmp_path / "a"))
    with open(tmp_path / "a" / "adapter_config.json") as f:
        config = json.load(f)
    ranks = {s: r.r for s, r in cm.lora_records().items()}
    from lorafx.graph_utils import pattern_value
    assert {s: pattern_value(s, config["rank_pattern"], config["r"]) for s in ranks} == ranks
    again = lorafx.load_adapter(model, str(tmp_path / "a"), example_kwargs={"input_ids": ids(2, 8)})
    assert {s: r.r for s, r in again.lora_records().items()} == ranks


def test_peft_loads_the_allocated_adapter(tiny_model, tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    cm = _compile(model, rank_budget=1.0, proxy="snip")
    from conftest import randomise_lora_B
    randomise_lora_B(cm, seed=1, scale=0.1)
    cm.save_adapter(str(tmp_path / "a"))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "a"))
    x = ids(2, 8, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=x).logits, cm.eval()(input_ids=x).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # the CLI itself is tested in test_cli.py; this adds rank_budget through it
def test_cli_compile_with_a_rank_budget(tmp_path):
    from lorafx.cli import main
    import io, contextlib
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["compile", "--model", "tiny-llama", "--out", str(tmp_path / "o"), "--no-draw",
                     "--rank-budget", "1.0", "--proxy", "grad_norm"])
    assert code == 0, out.getvalue()
    text = out.getvalue()
    assert "rank_budget=1.0 proxy=grad_norm" in text and "proxy=grad_norm graded: budget" in text
    with open(tmp_path / "o" / "report.json") as f:
        data = json.load(f)
    assert data["options"]["rank_budget"] == 1.0
    info = next(p for p in data["passes"] if p["name"] == "AllocateRanks")["info"]
    assert info["used"] <= info["budget"]
    assert main(["compile", "--model", "tiny-llama", "--out", str(tmp_path / "p"), "--no-draw",
                 "--rank-budget", "-3"]) == 2


# -- the reproduction tool --------------------------------------------------------------------------------------

def _table_tool():
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "tools", "heterolora_table.py")
    spec = importlib.util.spec_from_file_location("heterolora_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_table_methods_map_to_compile_options():
    tool = _table_tool()
    assert tool.method_options("uniform", 100) == {"r": 8, "target_modules": ["q_proj", "v_proj"]}
    assert tool.method_options("snip-topk", 100) == {"rank_budget": 100, "proxy": "snip", "allocation": "topk"}
    assert tool.method_options("random+shortcuts", 100) == {"rank_budget": 100, "proxy": "random",
                                                             "allocation": "graded", "shortcuts": True}
    rows = [{"method": m, "task": t, "seed": s, "accuracy": acc, "trainable": 10, "train_seconds": 10.0,
             "allocate_seconds": 0.5} for m, t, s, acc in
            [("a", "x", 0, 10.0), ("a", "y", 0, 20.0), ("a", "x", 1, 30.0), ("a", "y", 1, 40.0)]]
    out = tool.summarise(rows, ["a"], ["x", "y"], [0, 1])["a"]
    assert out["per_seed"] == [15.0, 35.0] and out["mean"] == 25.0
    assert out["std"] == pytest.approx(14.1421356) and out["tasks"]["x"]["mean"] == 20.0
    assert out["allocate_share_median"] == 0.05


@pytest.mark.slow
def test_table_tool_runs_end_to_end(tmp_path):
    import subprocess, sys
    tool = os.path.join(os.path.dirname(__file__), "..", "tools", "heterolora_table.py")
    run = subprocess.run([sys.executable, tool, "--methods", "uniform,snip+shortcuts", "--tasks", "add", "--seeds",
                          "0", "--steps", "3", "--n-test", "8", "--jobs", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    with open(tmp_path / "heterolora.json") as f:
        data = json.load(f)
    assert set(data["summary"]) == {"uniform", "snip+shortcuts"}
    assert data["summary"]["snip+shortcuts"]["trainable"] <= data["config"]["budget"]
    assert "snip+shortcuts" in run.stdout


def test_planning_without_weights_takes_a_weight_free_proxy():
    from transformers import LlamaConfig, LlamaForCausalLM
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=96))
    inputs = {"input_ids": torch.zeros(2, 8, dtype=torch.long, device="meta")}
    cm = lorafx.compile(model, example_kwargs=inputs, rank_budget=1.0, proxy="constant", shortcuts=True, seed=0)
    info = _allocation_info(cm)
    assert 0 < info["used"] <= info["budget"]
    assert all(p.is_meta for p in cm.parameters())
    with pytest.raises(ValueError, match="meta device.*proxy='random' or 'constant'"):
        lorafx.compile(model, example_kwargs=inputs, rank_budget=1.0, proxy="snip", seed=0)
