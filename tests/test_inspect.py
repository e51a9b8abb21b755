"""Looking at graphs: format_graph, diff_graphs, to_networkx, draw and the instruments."""
import copy
import io
import os

import pytest
import torch
import torch.fx

import lorafx
from lorafx.inspect import _is_plumbing, _lanes
from lorafx.meta import LoraRecord, OriginRecord, get_record
from lorafx.passes import InsertLoRA, SetTrainingMode


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(8, 6)
        self.v = torch.nn.Linear(8, 6)
        self.out = torch.nn.Linear(6, 4)

    def forward(self, x):
        return self.out(torch.relu(self.q(x)) * self.v(x))


def _lora_pass(**kw):
    return InsertLoRA(**{"r": 2, "alpha": 4.0, "target_modules": ["q", "v"], "seed": 0, **kw})


@pytest.fixture(scope="module")
def graphs():
    """(captured copy, rewritten) for Net with adapters on q and v."""
    torch.manual_seed(0)
    gm = lorafx.capture(Net(), (torch.randn(3, 8),))
    before = copy.deepcopy(gm)
    after = lorafx.Pipeline([_lora_pass()])(gm).graph_module
    return before, after


def _linear_nodes(gm, module):
    return [n.name for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)
            and getattr(get_record(n, OriginRecord), "module", None) == module]


def _lora_nodes(gm):
    return [n for n in gm.graph.nodes if get_record(n, LoraRecord) is not None]


# -- format_graph ----------------------------------------------------------------------------


def test_format_graph_shows_lora_metadata_for_lora_nodes(graphs):
    _, after = graphs
    text = lorafx.format_graph(after)
    lines = {line.split(" ", 1)[0].split(":")[0]: line for line in text.splitlines() if line.startswith("%")}
    for name in ("q_lora", "v_lora"):
        line = lines[f"%{name}"]
        body, meta = line.split("  # ")
        assert body.startswith(f"%{name}: float32[") and "= lorafx.lora_linear(%x, %" in body
        assert meta == "by InsertLoRA; lora(r=2, alpha=4, scale=2)"
    # nodes the pass did not touch carry no lorafx column
    assert "#" not in lines["%relu"] and "#" not in lines["%mul"]
    assert text.splitlines()[-1] == "return (%linear_2,)"
    # get_attr nodes are hidden unless asked for
    assert "get_attr" not in text
    full = lorafx.format_graph(after, include_get_attr=True)
    assert "%q_lora_a = get_attr q.lora_A" in full and "%q_weight: float32[6,8] = get_attr q.weight" in full
    assert len(full.splitlines()) == len(after.graph.nodes)


def test_format_graph_shows_dropout_and_merged_state():
    gm = lorafx.capture(Net(), (torch.randn(3, 8),))
    lorafx.Pipeline([_lora_pass(dropout=0.25)])(gm)
    text = lorafx.format_graph(gm)
    assert text.count("lora(r=2, alpha=4, scale=2, dropout=0.25)") == 2
    assert text.count("lorafx.dropout_mask(") == 2
    from lorafx.passes import MergeLoRA
    MergeLoRA()(gm)
    assert "merged)" in lorafx.format_graph(gm)


# -- diff_graphs -----------------------------------------------------------------------------


def test_diff_graphs_lists_created_lora_nodes_and_erased_linears(graphs):
    before, after = graphs
    d = lorafx.diff_graphs(before, after)
    lora = {n.name for n in _lora_nodes(after)}
    adapters = {n.name for n in after.graph.nodes if n.op == "get_attr" and n.target.endswith(("lora_A", "lora_B"))}
    assert lora == {"q_lora", "v_lora"} and len(adapters) == 4
    assert set(d.created) == lora | adapters
    assert set(d.erased) == set(_linear_nodes(before, "q") + _linear_nodes(before, "v"))
    assert len(d.erased) == 2
    assert not set(_linear_nodes(before, "out")) & set(d.erased)  # the unadapted linear stays
    assert str(d).splitlines()[0] == "+6 nodes, -2 nodes"
    assert any(l.startswith("+%q_lora:") and "lorafx.lora_linear" in l for l in d.lines)
    assert any(l.startswith("-%") and "aten.linear(%x, %q_weight" in l for l in d.lines)
    assert not lorafx.diff_graphs(after, after).lines


# -- to_networkx -----------------------------------------------------------------------------


def test_to_networkx_matches_the_fx_graph(graphs):
    _, after = graphs
    G = lorafx.to_networkx(after)
    assert G.number_of_nodes() == len(after.graph.nodes)
    assert G.number_of_edges() == sum(len(n.users) for n in after.graph.nodes)
    flagged = {name for name, attrs in G.nodes(data=True) if attrs["lora"]}
    assert flagged == {"q_lora", "v_lora"}
    assert G.nodes["q_lora"]["site"] == "q" and G.nodes["q_lora"]["target"] == "lorafx.lora_linear"
    assert "lora(r=2" in G.nodes["q_lora"]["lorafx"]
    assert G.nodes["relu"]["site"] == "" and G.nodes["x"]["op"] == "placeholder"
    assert set(G.predecessors("q_lora")) == {"x", "q_weight", "q_bias", "q_lora_a", "q_lora_b"}
    assert list(G.successors("q_lora")) == ["relu"]
    import networkx as nx
    assert nx.is_directed_acyclic_graph(G)


# -- draw ------------------------------------------------------------------------------------


def test_draw_writes_svg_and_png(graphs, tmp_path):
    before, after = graphs
    svg = lorafx.draw(after, str(tmp_path / "sub" / "g.svg"))  # creates the folder
    png = lorafx.draw(after, str(tmp_path / "g.png"))
    assert svg.endswith("g.svg") and os.path.getsize(svg) > 1000
    with open(png, "rb") as f:
        head = f.read(8)
    assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 1000
    text = open(svg).read()
    assert "<svg" in text
    # labels are real text: adapters are named with their rank and shapes
    assert "q_lora  LoRA r=2 alpha=4 8-&gt;6" in text and "v_lora" in text and "relu = relu" in text
    # adapters are red: one legend swatch in the plain graph, plus marker and label per adapter
    red = "#d62728"
    assert open(lorafx.draw(before, str(tmp_path / "b.svg"))).read().count(red) == 1
    assert text.count(red) >= 1 + 2 * 2


def test_draw_hides_plumbing_unless_asked(graphs, tmp_path):
    _, after = graphs
    hidden = [n for n in after.graph.nodes if _is_plumbing(n)]
    assert [n.name for n in hidden] == ["_guards_fn"]
    simple = open(lorafx.draw(after, str(tmp_path / "a.svg"))).read()
    full = open(lorafx.draw(after, str(tmp_path / "b.svg"), simplify=False, include_get_attr=True)).read()
    assert "_guards_fn" not in simple and "_guards_fn" in full
    assert "q_lora_a = q.lora_A" in full and "q_lora_a" not in simple


def test_draw_refuses_other_formats(graphs, tmp_path):
    _, after = graphs
    with pytest.raises(ValueError, match=r"unsupported file type '\.jpg'.*\.svg"):
        lorafx.draw(after, str(tmp_path / "g.jpg"))
    assert not (tmp_path / "g.jpg").exists()


class Branchy(torch.nn.Module):
    def forward(self, x, y):
        a = x.relu()
        b = x.sigmoid()
        c = a + b
        d = (x * c).tanh()
        e = d + a + y
        f = (e * b).exp()
        return f + x, b


def _check_lanes(gm):
    nodes = [n for n in gm.graph.nodes if n.op != "get_attr"]
    row = {n: i for i, n in enumerate(nodes)}
    inputs = {n: list(dict.fromkeys(p for p in n.all_input_nodes if p in row)) for n in nodes}
    lane = dict(zip(nodes, _lanes(nodes, inputs)))
    for p in nodes:
        last = max((row[u] for u in p.users if u in row), default=row[p])
        for n in nodes[row[p] + 1:last + 1]:
            # while p's value is live its lane is kept for its edges: only its last user may sit there
            if lane[n] == lane[p]:
                assert row[n] == last and p in inputs[n], (p.name, n.name)
    return lane


def test_draw_lanes_never_run_an_edge_through_a_node(tmp_path):
    gm = torch.fx.symbolic_trace(Branchy())
    lane = _check_lanes(gm)
    assert len(set(lane.values())) >= 2  # x stays live beside the chain
    names = {n.name: l for n, l in lane.items()}
    assert names["x"] == 0 and names["relu"] != 0  # x is used again later, so relu branches off
    chain = ["add", "mul", "tanh", "add_1", "add_2", "mul_1", "exp", "add_3", "output"]
    assert len({names[c] for c in chain}) == 1  # each is its input's last use: one straight lane
    lorafx.draw(gm, str(tmp_path / "branchy.png"))  # no shape metadata: still draws


def test_draw_lanes_on_a_transformer_graph(tmp_path):
    from lorafx.models import load_model
    model, kwargs = load_model("tiny-mistral")
    cm = lorafx.compile(model, example_kwargs=kwargs, r=2)
    lane = _check_lanes(cm.graph_module)
    assert max(lane.values()) < 25  # lanes are reused, not one per node
    path = lorafx.draw(cm.graph_module, str(tmp_path / "mistral.svg"))
    text = open(path).read()
    assert "model.layers.0" in text and "model.layers.1" in text  # block bands are labelled
    assert text.count("LoRA r=2") == len(cm.lora_records())


# -- instruments -----------------------------------------------------------------------------


def test_dump_graphs_writes_captured_graph_and_one_file_per_pass(tmp_path):
    dump = lorafx.DumpGraphs(str(tmp_path / "dump"), draw=True)
    cm = lorafx.compile(Net(), example_inputs=(torch.randn(3, 8),), r=2, target_modules=["q", "v"],
                        instruments=[dump])
    files = sorted(os.listdir(tmp_path / "dump"))
    stems = ["00_captured"] + [f"{i:02d}_{p.name}" for i, p in enumerate(cm.report().passes, 1)]
    assert files == sorted(f"{stem}.{ext}" for stem in stems for ext in ("svg", "txt"))
    assert any(s.endswith("_InsertLoRA") for s in stems) and stems[-1].endswith("_SetTrainingMode")
    captured = (tmp_path / "dump" / "00_captured.txt").read_text()
    assert captured.count("aten.linear(") == 3 and "lora" not in captured
    inserted = (tmp_path / "dump" / f"{next(s for s in stems if s.endswith('_InsertLoRA'))}.txt").read_text()
    assert inserted.count("lorafx.lora_linear(") == 2 and inserted.count("aten.linear(") == 1
    last = (tmp_path / "dump" / f"{stems[-1]}.txt").read_text()
    assert last == lorafx.format_graph(cm.graph_module, include_get_attr=True) + "\n"


def test_print_diff_and_time_instruments():
    gm = lorafx.capture(Net(), (torch.randn(3, 8),))
    printed, diffed = io.StringIO(), io.StringIO()
    timer = lorafx.TimePasses()
    lorafx.Pipeline([_lora_pass(), SetTrainingMode(train=False)],
                    instruments=[lorafx.PrintGraphs(printed), lorafx.DiffGraphs(diffed), timer])(gm)
    assert printed.getvalue().count("=== after ") == 2 and "lorafx.lora_linear(" in printed.getvalue()
    out = diffed.getvalue()
    assert "=== InsertLoRA: +6 nodes, -2 nodes" in out
    assert "=== SetTrainingMode: +0 nodes, -0 nodes" in out
    assert [name for name, _ in timer.times] == ["InsertLoRA", "SetTrainingMode"]
    assert all(s >= 0 for _, s in timer.times)
