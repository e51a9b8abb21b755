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


# -- folding repeated layers and the HTML view ---------------------------------------------------

def _meta_llama(layers, **shape):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=96)
    cfg.update(shape)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **cfg))
    ids = torch.zeros(2, 8, dtype=torch.long, device="meta")
    return lorafx.compile(model, example_kwargs={"input_ids": ids}, rank_budget=1.0, proxy="constant", seed=0)


@pytest.fixture(scope="module")
def plan5():
    """A 5-layer LLaMA (one more than FOLD_ABOVE) planned on the meta device: AllocateRanks gives
    the layers different ranks."""
    return _meta_llama(5)


def _svg_groups(text, prefix):
    """{gid: the text inside} for every ``<g id="prefix...">`` holding one text element."""
    import re
    return {m.group(1): m.group(2) for m in
            re.finditer(r'<g id="' + prefix + r'([^"]+)">\s*<text[^>]*>([^<]*)</text>', text)}


def test_repeated_blocks_finds_the_decoder_layers_and_their_ranks(plan5):
    from lorafx.inspect import repeated_blocks
    gm = plan5.graph_module
    groups = repeated_blocks(gm)
    assert list(groups) == ["model.layers"]  # embed_tokens, norm, rotary_emb are not repeated
    blocks = groups["model.layers"]
    assert [b.name for b in blocks] == [f"model.layers.{i}" for i in range(5)]
    assert len({b.pattern for b in blocks}) == 1 and blocks[0].module_type == "LlamaDecoderLayer"
    records = plan5.lora_records()
    for b in blocks:
        assert [s.name for s in b.sites] == [s for s in records if s.startswith(b.name + ".")]
        assert all(s.r == records[s.name].r and s.kind == "lora" and not s.parts for s in b.sites)
        assert [s.short for s in b.sites] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"]
    assert len({tuple(s.r for s in b.sites) for b in blocks}) > 1  # the allocation differs between layers
    # every graph node belongs to at most one block
    members = [n for b in blocks for n in b.nodes]
    assert len(members) == len(set(members))


def test_draw_folds_each_repeated_layer_into_one_box(plan5, tmp_path):
    gm, records = plan5.graph_module, plan5.lora_records()
    text = open(lorafx.draw(gm, str(tmp_path / "plan.svg"))).read()
    headers = _svg_groups(text, "fold-header-")
    assert sorted(headers) == [f"model.layers.{i}" for i in range(1, 5)]  # one box per folded layer
    for name, header in headers.items():
        assert header.startswith(f"{name}  LlamaDecoderLayer folded: ") and "7 adapters" in header
        assert text.count(f'<g id="fold-{name}">') == 1  # its frame
    cells = _svg_groups(text, "site-")
    folded = {s: r for s, r in records.items() if not s.startswith("model.layers.0.")}
    assert cells == {s: f"{s.rsplit('.', 1)[-1]} r={rec.r}" for s, rec in folded.items()}
    # layer 0 in full: every node of it drawn with its label; no node of a folded layer is
    for s, rec in records.items():
        node = s.replace(".", "_") + "_lora"
        assert (f"{node}  LoRA r={rec.r}" in text or f"{node}  LoRA lora_linear" in text) == s.startswith(
            "model.layers.0."), s
    assert "model.layers.0 (in full)" in text and "add_8 = add.Tensor" in text and "add_14 = " not in text
    assert "model.layers: 5 blocks, model.layers.0 in full, 4 folded" in text


def test_draw_fold_options(plan5, tmp_path):
    gm = plan5.graph_module
    full = open(lorafx.draw(gm, str(tmp_path / "full.svg"), fold=False)).read()
    assert not _svg_groups(full, "fold-header-") and "model_layers_4_mlp_down_proj_lora  LoRA r=" in full
    picked = open(lorafx.draw(gm, str(tmp_path / "picked.svg"), full_layers=[0, 3])).read()
    assert sorted(_svg_groups(picked, "fold-header-")) == [f"model.layers.{i}" for i in (1, 2, 4)]
    assert "model_layers_3_self_attn_o_proj_lora  LoRA r=" in picked
    assert "model.layers.0, model.layers.3 in full" in picked
    with pytest.raises(ValueError, match=r"no repeated block 9 \(repeated structures: model.layers.0-4\)"):
        lorafx.draw(gm, str(tmp_path / "bad.svg"), full_layers=9)
    with pytest.raises(ValueError, match="fold=False folds nothing; pass one of them"):
        lorafx.draw(gm, str(tmp_path / "bad.svg"), fold=False, full_layers=[0])
    assert not (tmp_path / "bad.svg").exists()


def _html_tree(page):
    """[(node name, the details ids it sits in, outermost first, its line's text)] of a to_html page."""
    from html.parser import HTMLParser

    class Parser(HTMLParser):
        def __init__(self):
            super().__init__()
            self.stack, self.nodes, self.current = [], [], None

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "details":
                self.stack.append(a["id"][2:])
            elif tag == "div" and a.get("id", "").startswith("n-"):
                self.current = [a["id"][2:], tuple(self.stack), ""]

        def handle_endtag(self, tag):
            if tag == "details":
                self.stack.pop()
            elif tag == "div" and self.current:
                self.nodes.append(tuple(self.current))
                self.current = None

        def handle_data(self, data):
            if self.current:
                self.current[2] += data

    p = Parser()
    p.feed(page)
    assert not p.stack  # every section closed
    return p.nodes


def test_to_html_lists_every_node_once_nested_by_module(plan5, tmp_path):
    from lorafx.printing import format_node
    gm, records = plan5.graph_module, plan5.lora_records()
    page = open(lorafx.to_html(gm, str(tmp_path / "g.html"))).read()
    assert "<script src" not in page and "http" not in page.split("<body>")[1]  # self-contained
    nodes = _html_tree(page)
    assert sorted(name for name, _, _ in nodes) == sorted(n.name for n in gm.graph.nodes)  # each exactly once
    where = {name: stack for name, stack, _ in nodes}
    lines = {name: line for name, _, line in nodes}
    by_name = {n.name: n for n in gm.graph.nodes}
    for name, stack in where.items():
        assert lines[name] == format_node(by_name[name])  # op, shape and records
        origin = get_record(by_name[name], OriginRecord)
        if origin is not None and origin.module and not origin.module.startswith("_"):
            parts = origin.module.split(".")
            assert stack == ("root",) + tuple(".".join(parts[:k]) for k in range(1, len(parts) + 1)), name
    assert where["model_layers_3_self_attn_q_proj_lora"][-3:] == (
        "model.layers.3", "model.layers.3.self_attn", "model.layers.3.self_attn.q_proj")
    assert where["model_layers_3_self_attn_q_proj_lora_a"] == where["model_layers_3_self_attn_q_proj_lora"]
    assert where["input_ids"] == ("root",) and where["output"] == ("root",)
    # every adapter's rank: on its node line and in its layer's heading
    for site, rec in records.items():
        assert f"lora(r={rec.r}, alpha=16" in lines[site.replace(".", "_") + "_lora"]
        assert f'<span class="site lora">{site.rsplit(".", 1)[-1]} r={rec.r}</span>' in page
    assert page.count('<span class="site lora">') == 2 * len(records)  # in the layer's and the site's heading
    assert lorafx.draw(gm, str(tmp_path / "d.html")) == str(tmp_path / "d.html")
    assert (tmp_path / "d.html").read_text() == page


def test_folded_boxes_and_html_show_the_parts_of_a_placed_graph(tiny_model, tmp_path):
    from conftest import ids
    cm = lorafx.compile(tiny_model("llama"), target="cim", example_kwargs={"input_ids": ids(2, 8)},
                        noise_sigma=0.05)
    gm = cm.graph_module
    from lorafx.inspect import _fold_choice, repeated_blocks
    assert _fold_choice(repeated_blocks(gm), None, None) == (set(), set())  # 2 layers: drawn in full by default
    text = open(lorafx.draw(gm, str(tmp_path / "cim.svg"), fold=True)).read()  # and folded on request
    assert sorted(_svg_groups(text, "fold-header-")) == ["model.layers.1"]
    cells = _svg_groups(text, "site-")
    assert cells == {s: f"{s.rsplit('.', 1)[-1]} r=8 @rram+sram" for s in cm.lora_records()
                     if s.startswith("model.layers.1.")}
    import re
    cell = re.search(r'<g id="site-model.layers.1.mlp.up_proj">\s*<text style="([^"]*)"', text).group(1)
    assert "fill: #d62728" in cell  # the adapter's part (SRAM) colours the cell
    page = open(lorafx.to_html(gm, str(tmp_path / "cim.html"))).read()
    assert page.count('<span class="site sram">q_proj r=8 @rram+sram</span>') == 4  # 2 layers x 2 headings
    lines = {name: line for name, _, line in _html_tree(page)}
    assert "@rram" in lines["model_layers_1_self_attn_q_proj_lora_rram"]
    assert '<div class="n rram" id="n-model_layers_1_self_attn_q_proj_lora_rram">' in page


@pytest.mark.slow
def test_draw_an_8b_shaped_plan(tmp_path):
    import time
    cm = _meta_llama(32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256)
    gm = cm.graph_module
    start = time.perf_counter()
    svg = lorafx.draw(gm, str(tmp_path / "plan.svg"))
    seconds = time.perf_counter() - start
    text = open(svg).read()
    assert sorted(_svg_groups(text, "fold-header-")) == sorted(f"model.layers.{i}" for i in range(1, 32))
    assert len(_svg_groups(text, "site-")) == 31 * 7
    assert seconds < 20 and os.path.getsize(svg) < 1_500_000, (seconds, os.path.getsize(svg))
    start = time.perf_counter()
    page = lorafx.to_html(gm, str(tmp_path / "plan.html"))
    assert time.perf_counter() - start < 10 and os.path.getsize(page) < 4_000_000
    assert len(_html_tree(open(page).read())) == len(gm.graph.nodes)
