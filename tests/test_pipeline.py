"""The pass protocol: ordering, errors naming passes, lint, instruments, metadata."""
import copy
import dataclasses
import pickle
from dataclasses import dataclass

import pytest
import torch

import lorafx
from lorafx.meta import LoraRecord, get_record
from lorafx.passes import InsertLoRA, MergeLoRA, SetTrainingMode, UnmergeLoRA
from lorafx.pipeline import PassResult
from lorafx.testing import MLP


@pytest.fixture
def gm():
    torch.manual_seed(0)
    return lorafx.capture(MLP([4, 6, 3]).eval(), (torch.randn(2, 4),))


def test_wrong_order_is_refused_naming_the_passes():
    with pytest.raises(lorafx.PipelineOrderError, match=r"MergeLoRA \(position 0\) requires \['lora'\].*move InsertLoRA before MergeLoRA"):
        lorafx.Pipeline([MergeLoRA(), InsertLoRA()])
    with pytest.raises(lorafx.PipelineOrderError, match="add a pass that provides it"):
        lorafx.Pipeline([SetTrainingMode(), UnmergeLoRA()])


def test_pipeline_runs_in_order_and_reports(gm):
    timer = lorafx.TimePasses()
    result = lorafx.Pipeline([InsertLoRA(r=2), MergeLoRA(), SetTrainingMode(train=False)], instruments=[timer])(gm)
    names = [r.name for r in result.info["reports"]]
    assert names == ["InsertLoRA", "MergeLoRA", "SetTrainingMode"] == [n for n, _ in timer.times]
    assert result.info["reports"][0].nodes_after > result.info["reports"][0].nodes_before
    assert result.modified


def test_a_pipeline_is_a_pass(gm):
    inner = lorafx.Pipeline([InsertLoRA(r=2)])
    outer = lorafx.Pipeline([inner, MergeLoRA()])  # order check sees what the inner pipeline provides
    outer(gm)
    assert all(n.target is not torch.ops.lorafx.lora_linear.default for n in gm.graph.nodes)


@dataclass(frozen=True)
class Explodes(lorafx.Pass):
    def run(self, gm):
        raise RuntimeError("boom")


@dataclass(frozen=True)
class ReadsMissingAttribute(lorafx.Pass):
    def run(self, gm):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            gm.graph.get_attr("no.such.weight")
        return PassResult(gm, True)


def test_failing_pass_is_named_with_its_history(gm):
    with pytest.raises(lorafx.PassError, match=r"pass Explodes failed \(passes run before it: InsertLoRA, SetTrainingMode\).*boom"):
        lorafx.Pipeline([InsertLoRA(r=2), SetTrainingMode(), Explodes()])(gm)


def test_graph_is_linted_after_every_pass(gm):
    with pytest.raises(lorafx.PassError, match="ReadsMissingAttribute.*no.such.weight"):
        lorafx.Pipeline([ReadsMissingAttribute()])(gm)


def test_pass_run_alone_checks_requirements(gm):
    with pytest.raises(lorafx.PassError, match=r"MergeLoRA requires \['lora'\]"):
        MergeLoRA()(gm)


def test_pass_options_are_validated_and_frozen():
    with pytest.raises(ValueError, match="init"):
        InsertLoRA(init="xavier")
    p = InsertLoRA(r=4, target_modules=["a", "b"])
    assert p.target_modules == ("a", "b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.r = 8


def test_metadata_is_typed_and_survives_deepcopy_and_pickle(gm):
    InsertLoRA(r=2)(gm)
    node = next(n for n in gm.graph.nodes if n.target is torch.ops.lorafx.lora_linear.default)
    rec = get_record(node, LoraRecord)
    assert rec.site == "layers.0" and rec.r == 2
    assert pickle.loads(pickle.dumps(node.meta["lorafx"]))["LoraRecord"] == rec
    clone = copy.deepcopy(gm)
    node2 = next(n for n in clone.graph.nodes if n.name == node.name)
    assert get_record(node2, LoraRecord) == rec


def test_set_training_mode_flips_dropout_and_sdpa(tiny_model):
    model = tiny_model("bert")
    gm = lorafx.capture(model, (torch.randint(0, 96, (2, 8)),))
    dropouts = [n for n in gm.graph.nodes if n.target is torch.ops.aten.dropout.default]
    sdpa = [n for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert dropouts and all(n.args[2] is True for n in dropouts)
    res = SetTrainingMode(train=False)(gm)
    assert res.info["flipped"] == len(dropouts) + len(sdpa)
    assert all(n.args[2] is False for n in dropouts) and all(n.args[4] == 0.0 for n in sdpa)
    SetTrainingMode(train=True)(gm)
    assert all(n.args[2] is True for n in dropouts) and all(n.args[4] == 0.1 for n in sdpa)


def test_instruments_print_and_diff(gm, capsys):
    lorafx.Pipeline([InsertLoRA(r=2)], instruments=[lorafx.PrintGraphs(), lorafx.DiffGraphs()])(gm)
    out = capsys.readouterr().out
    assert "=== after InsertLoRA" in out and "lorafx.lora_linear" in out
    assert "=== InsertLoRA: +" in out and "layers_0_lora" in out
