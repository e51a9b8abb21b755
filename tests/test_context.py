"""The compile context, declared options, custom pipelines and targets, typed graph state."""
import copy
import operator
import pickle
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch

import lorafx
from lorafx.hw_targets import CPUTarget, Target, get_target
from lorafx.meta import CostRecord, get_record, graph_record
from lorafx.options import Option, check_probability, options_table
from lorafx.passes import (DEFAULT_PASSES, FINAL_PASSES, AnnotateCost, FuseSiblings, InsertLoRA, SelectSchedule)
from lorafx.pipeline import Pass, PassResult, PipelineOrderError


class Net(torch.nn.Module):
    """Linear -> batch norm -> ReLU -> Linear, with an optional keyword input."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.norm = torch.nn.BatchNorm1d(16)
        self.down = torch.nn.Linear(16, 4)

    def forward(self, x, shift=None):
        h = self.down(torch.relu(self.norm(self.up(x))))
        return h if shift is None else h + shift


def _net():
    torch.manual_seed(0)
    return Net()


def _x(seed=1, batch=4):
    return torch.randn(batch, 8, generator=torch.Generator().manual_seed(seed))


def _snapshot(model):
    return {name: (p, p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone())
            for name, p in model.named_parameters()} | {
        name: (b, b.detach().clone(), False, None) for name, b in model.named_buffers()}


@dataclass(frozen=True)
class BackwardOnCalibration(Pass):
    """Runs forward and backward on every calibration batch (a gradient-based analysis)."""

    def run(self, gm, ctx):
        params = list(gm.parameters())
        for p in params:
            p.requires_grad_(True)
        seen = 0
        for args, kwargs in ctx.batches():
            gm(*args, **kwargs).square().sum().backward()
            seen += 1
        norms = {name: float(p.grad.norm()) for name, p in gm.named_parameters() if p.grad is not None}
        ctx.decide("grad_norms", lambda: norms)
        return PassResult(gm, False, {"batches": seen, "params_with_grad": len(norms)})


def test_a_pass_before_insert_lora_runs_backward_without_touching_the_model():
    model = _net().train()
    model.up.weight.grad = torch.ones_like(model.up.weight)  # a gradient of the user's own
    model.down.bias.requires_grad_(False)
    before = _snapshot(model)
    batches = [_x(seed) for seed in range(3)]
    passes = [BackwardOnCalibration(), *lorafx.default_passes(r=2)]
    cm = lorafx.compile(model, example_inputs=(_x(),), calibration=batches, seed=0, passes=passes)
    report = {r.name: r.info for r in cm.report().passes}
    assert report["BackwardOnCalibration"] == {"batches": 3, "params_with_grad": 6}
    after = _snapshot(model)
    assert after.keys() == before.keys()
    for name, (obj, value, flag, grad) in before.items():
        obj2, value2, flag2, grad2 = after[name]
        assert obj2 is obj and torch.equal(value2, value) and flag2 == flag, name  # running stats included
        assert (grad is None and grad2 is None) or torch.equal(grad, grad2), name
    assert model.down.weight.grad is None
    # the compiled model trains its adapters only
    assert set(cm.trainable_parameters()) == {"up.lora_A", "up.lora_B", "down.lora_A", "down.lora_B"}


class OnceOnly:
    """An iterable that refuses a second pass: recomputing a decision would fail."""

    def __init__(self, batches):
        self.batches, self.used = batches, 0

    def __iter__(self):
        self.used += 1
        if self.used > 1:
            raise AssertionError("calibration data read again: the decision was recomputed, not replayed")
        return iter(self.batches)


@dataclass(frozen=True)
class ScaleFromData(Pass):
    """Scales the output by a factor taken from the calibration data and the RNG."""

    requires = frozenset({"lora"})

    def run(self, gm, ctx):
        def measure():
            batches = [kwargs["x"] for _, kwargs in ctx.batches()]
            return float(torch.cat(batches).abs().mean()) + float(torch.rand(()))

        factor = ctx.decide("factor", measure)
        out = next(n for n in gm.graph.nodes if n.op == "output")
        first, *rest = out.args[0]  # torch.export's graphs return a flat tuple
        with gm.graph.inserting_before(out):
            scaled = gm.graph.call_function(operator.mul, (first, factor))
        out.args = ((scaled, *rest),)
        return PassResult(gm, True, {"factor": factor})


def _factor(gm):
    return next(n.args[1] for n in gm.graph.nodes if n.target is operator.mul)


def test_data_dependent_decisions_are_replayed_for_a_new_signature():
    model = _net().eval()
    calibration = OnceOnly([{"x": _x(seed)} for seed in range(2)])
    cm = lorafx.compile(model, example_inputs=(_x(),), calibration=calibration,
                        passes=[InsertLoRA(r=2), ScaleFromData()])
    decisions = cm.decisions
    assert set(decisions) == {"InsertLoRA#0:seed", "ScaleFromData#0:factor"}
    x = _x(5)
    plain = cm(x)
    shifted = cm(x, shift=torch.zeros(4))  # a new keyword signature: captured, the pipeline replayed
    assert len(cm._variants) == 2 and calibration.used == 1 and cm.decisions == decisions
    first, second = cm._variants.values()
    assert _factor(first) == _factor(second) == decisions["ScaleFromData#0:factor"]
    torch.testing.assert_close(shifted, plain)
    for name, p in cm.named_parameters():  # both graphs share every parameter
        assert second.get_parameter(name) is p is first.get_parameter(name)


def test_a_measured_schedule_is_replayed_not_measured_again(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFX_CACHE_DIR", str(tmp_path))
    cm = lorafx.compile(_net().eval(), example_inputs=(_x(),), r=2, schedule_criterion="time")
    rules = {k: v for k, v in cm.decisions.items() if ":rule:" in k}
    assert len(rules) == 2

    def measure_again(*args, **kwargs):
        raise AssertionError("measured again for a new call signature")

    monkeypatch.setattr(SelectSchedule, "_time_rule", measure_again)
    cm(_x(2), shift=torch.ones(4))
    assert len(cm._variants) == 2
    assert {k: v for k, v in cm.decisions.items() if ":rule:" in k} == rules


@dataclass(frozen=True)
class NeedsCost(Pass):
    requires = frozenset({"cost"})

    def run(self, gm, ctx):
        return PassResult(gm, False)


def test_a_rewrite_after_annotate_cost_drops_the_cost():
    gm = lorafx.capture(_net().eval(), (_x(),))
    lorafx.Pipeline([InsertLoRA(r=2, target_modules=["up"]), AnnotateCost()])(gm)
    assert "cost" in lorafx.pipeline.provided(gm) and graph_record(gm).cost is not None
    assert any(get_record(n, CostRecord) for n in gm.graph.nodes)
    InsertLoRA(r=2, target_modules=["down"])(gm)  # a rewrite: the records no longer describe the graph
    assert "cost" not in lorafx.pipeline.provided(gm) and graph_record(gm).cost is None
    assert not any(get_record(n, CostRecord) for n in gm.graph.nodes)
    with pytest.raises(PipelineOrderError, match=r"NeedsCost .*requires \['cost'\].*FuseSiblings invalidates it"):
        lorafx.Pipeline([InsertLoRA(), AnnotateCost(), FuseSiblings(), NeedsCost()])
    lorafx.Pipeline([InsertLoRA(), AnnotateCost(), FuseSiblings(), AnnotateCost(), NeedsCost()])  # re-annotated


@dataclass(frozen=True)
class RecordNoise(Pass):
    noise: float = 0.0

    def run(self, gm, ctx):
        return PassResult(gm, False, {"noise": self.noise, "target": ctx.target.name})

    def summary(self, info):
        return [f"noise {info['noise']:g} on {info['target']}", "second line from RecordNoise"]


@dataclass(frozen=True)
class NoisyTarget(Target):
    """A target with one option, which configures its lowering pass."""

    name: ClassVar[str] = "noisy-test"
    noise: float = 0.0
    options = (Option("noise", float, 0.0, "relative weight noise", check=check_probability),)

    def supports(self, node):
        return node.target is not torch.ops.aten.relu.default

    def passes(self, options=None):
        return [RecordNoise(noise=self.noise)]


def test_a_target_takes_its_options_and_its_passes_run():
    model = _net().eval()
    cm = lorafx.compile(model, example_inputs=(_x(),), target=NoisyTarget(), noise=0.25, r=2)
    assert cm.target == "noisy-test" and cm._context.target == NoisyTarget(noise=0.25)
    rows = {r.name: r for r in cm.report().passes}
    assert rows["RecordNoise"].info == {"noise": 0.25, "target": "noisy-test"}
    text = str(cm.report())
    assert "noise 0.25 on noisy-test" in text and "second line from RecordNoise" in text
    relu = next(n for n in cm.graph_module.graph.nodes if n.target is torch.ops.aten.relu.default)
    assert not cm._context.target.supports(relu) and CPUTarget().supports(relu)
    with pytest.raises(ValueError, match=r"noise must be in \[0, 1\)"):
        lorafx.compile(model, example_inputs=(_x(),), target=NoisyTarget(), noise=2.0)
    with pytest.raises(TypeError, match=r"unknown option.*'noise'.*target 'cpu' \(none\)"):
        lorafx.compile(model, example_inputs=(_x(),), noise=0.1)
    assert get_target(NoisyTarget, noise=0.5).noise == 0.5


def test_an_unknown_option_names_close_matches_and_every_declaration():
    with pytest.raises(TypeError) as info:
        lorafx.compile(_net(), example_inputs=(_x(),), alpah=4)
    message = str(info.value)
    assert "'alpah': did you mean 'alpha'?" in message
    for part in ("InsertLoRA ('r', 'alpha'", "SelectSchedule ('schedule', 'schedule_criterion'",
                 "FoldLoRAIntoBase ('fold_a')", "FuseSiblings ('fuse_siblings')", "target 'cpu' (none)",
                 "compile itself ('target'"):
        assert part in message, part


def test_custom_pipelines_and_how_they_meet_options():
    model = _net().eval()
    passes = [p for p in lorafx.default_passes(r=2, fuse_siblings=False) if not isinstance(p, AnnotateCost)]
    # switched on by fold_a, rank_budget, shortcuts, sparsity, modules_to_save, trainable_token_indices
    off = ("FoldLoRAIntoBase", "AllocateRanks", "InsertShortcuts", "PruneWeights", "ApplySparsity", "ModulesToSave",
           "TrainableTokens")
    eager = [t for t in (*DEFAULT_PASSES, *FINAL_PASSES) if t.__name__ not in off]
    assert [type(p) for p in lorafx.default_passes()] == eager  # eager: FuseSiblings on, FoldLoRAIntoBase off
    assert FuseSiblings not in [type(p) for p in lorafx.default_passes(backend="inductor")]
    cm = lorafx.compile(model, example_inputs=(_x(),), passes=passes)
    assert [r.name for r in cm.report().passes] == [p.name for p in passes]
    assert cm.report().cost is None and cm.report().adapter_sites == 2
    with pytest.raises(TypeError, match=r"pass option\(s\) \['r'\] together with passes=.*declared by InsertLoRA"):
        lorafx.compile(model, example_inputs=(_x(),), passes=[InsertLoRA()], r=4)
    with pytest.raises(TypeError, match=r"unknown option.*'fold_a'"):  # no pass here declares it
        lorafx.compile(model, example_inputs=(_x(),), passes=[InsertLoRA()], fold_a=True)


@pytest.mark.parametrize("cls", [*DEFAULT_PASSES, *FINAL_PASSES], ids=lambda c: c.__name__)
def test_declared_defaults_are_the_field_defaults(cls):
    fields = cls.__dataclass_fields__
    for opt in cls.options:
        if opt.enables:
            assert opt.target_field not in fields
            continue
        f = fields[opt.target_field]
        default = f.default_factory() if callable(f.default_factory) else f.default
        assert default == opt.default, (cls.__name__, opt.name)


def test_the_readme_options_table_is_the_declarations():
    import os
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    assert options_table(lorafx.compiler.declarations()) in readme, (
        "regenerate the README's options table: python -c \"import lorafx; "
        "print(lorafx.options.options_table(lorafx.compiler.declarations()))\"")


def test_the_graph_record_is_typed_and_copies():
    cm = lorafx.compile(_net().eval(), example_inputs=(_x(),), r=2)
    rec = graph_record(cm.graph_module)
    assert isinstance(rec, lorafx.GraphRecord) and rec.inputs == ("x",)
    assert list(rec.dims.values()) == ["batch"]
    assert {"captured", "lora", "schedule", "cost", "training_mode"} <= rec.provided and rec.training is False
    assert not any(k.startswith("lorafx_") for k in cm.graph_module.meta)
    for clone in (copy.deepcopy(rec), pickle.loads(pickle.dumps(rec))):
        assert clone == rec and clone is not rec
    assert "provided=" in rec.describe()
