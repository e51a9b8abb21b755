"""Saving and loading the whole compiled program (``cm.save_program`` / ``lorafx.load_program``).

The loaded program must compute the same bits as the compiled model it was saved from,
give the same adapter gradients, and keep training identically; a save is atomic, and a
folder that is not a program (or is corrupt, mixed, or of a newer format) is refused with
the fix.
"""
import io
import json
import os
import pickletools
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

import lorafx
from lorafx.program_io import MANIFEST_NAME, PROGRAM_NAME, ProgramFormatError

from conftest import randomise_lora_B


class MLP(torch.nn.Module):
    def __init__(self, batch_norm: bool = False):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.norm = torch.nn.BatchNorm1d(32) if batch_norm else torch.nn.Identity()
        self.fc2 = torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def _mlp_model(**kw):
    torch.manual_seed(0)
    cm = lorafx.compile(MLP(**kw), example_inputs=(torch.randn(4, 16),), r=4, seed=0)
    randomise_lora_B(cm)
    return cm


def _llama():
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=96)
    return T.LlamaForCausalLM(cfg)


def _ids(batch, seq, seed=0):
    return torch.randint(0, 96, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _step(model, loss_fn, lr=0.1):
    """One SGD step on ``model``'s adapters; returns the loss and the gradients by name."""
    params = model.trainable_parameters()
    opt = torch.optim.SGD(params.values(), lr=lr)
    opt.zero_grad()
    loss = loss_fn(model)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in params.items()}
    opt.step()
    return loss.detach(), grads


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """A tiny LLaMA compiled with adapter dropout, saved, and loaded."""
    cm = lorafx.compile(_llama(), example_inputs=(_ids(2, 8),), r=4, dropout=0.1, seed=0)
    randomise_lora_B(cm)
    folder = tmp_path_factory.mktemp("prog") / "llama"
    cm.save_program(str(folder))
    return cm, lorafx.load_program(str(folder)), folder


def test_llama_outputs_identical_at_every_shape(llama_pair):
    cm, lm, _ = llama_pair
    assert isinstance(lm, lorafx.LoadedProgram) and isinstance(lm, lorafx.CompiledModel)
    cm.eval(), lm.eval()
    with torch.no_grad():
        for batch, seq in [(2, 8), (1, 1), (3, 5), (4, 17)]:  # the example's size and others
            a, b = cm(input_ids=_ids(batch, seq, seed=batch)), lm(input_ids=_ids(batch, seq, seed=batch))
            assert type(b) is type(a)  # the transformers ModelOutput comes back
            assert torch.equal(a.logits, b.logits), (batch, seq)
    # train mode: adapter dropout is active again after load, and draws the same masks
    cm.train(), lm.train()
    x = _ids(2, 6, seed=7)
    with torch.no_grad():
        torch.manual_seed(3)
        a = cm(input_ids=x).logits
        torch.manual_seed(3)
        b = lm(input_ids=x).logits
        evaluated = lm.eval()(input_ids=x).logits
    assert torch.equal(a, b) and not torch.equal(b, evaluated)
    lm.train()


def test_llama_trains_identically_after_load(llama_pair):
    cm, lm, _ = llama_pair
    assert list(lm.trainable_parameters()) == list(cm.trainable_parameters())
    assert all(name.endswith(("lora_A", "lora_B")) for name in lm.trainable_parameters())
    assert not any(p.requires_grad for n, p in lm.named_parameters() if not n.endswith(("lora_A", "lora_B")))
    assert lm.state_dict().keys() == cm.state_dict().keys()
    x = _ids(3, 9, seed=1)

    def loss(model):
        torch.manual_seed(5)  # the same dropout masks in both
        logits = model(input_ids=x).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), x[:, 1:].reshape(-1))

    cm.train(), lm.train()
    loss_a, grads_a = _step(cm, loss)
    loss_b, grads_b = _step(lm, loss)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    for (n, p), q in zip(cm.trainable_parameters().items(), lm.trainable_parameters().values()):
        assert torch.equal(p, q), n
    assert torch.equal(loss(cm), loss(lm))  # the next outputs after the step


def test_llama_records_kept(llama_pair, tmp_path):
    cm, lm, folder = llama_pair
    assert lm.lora_records() == cm.lora_records()
    assert "lora(r=4" in lm.graph_report()
    assert str(lm.report()) == str(cm.report())
    # the folder holds a PEFT adapter; the loaded model saves the same one
    lm.save_adapter(str(tmp_path / "again"))
    cm.save_adapter(str(tmp_path / "orig"))
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (folder / name).exists()
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text()) == \
        json.loads((tmp_path / "orig" / "adapter_config.json").read_text())
    # merge and unmerge work on the loaded graph, and give the compiled model's bits
    lm.eval(), cm.eval()
    x = _ids(2, 5, seed=2)
    with torch.no_grad():
        before = lm(input_ids=x).logits
        lm.merge(), cm.merge()
        merged_l, merged_c = lm(input_ids=x).logits, cm(input_ids=x).logits
        lm.unmerge(), cm.unmerge()
        after = lm(input_ids=x).logits
    assert torch.equal(merged_l, merged_c) and torch.allclose(merged_l, before, atol=1e-5)
    assert torch.equal(after, before)
    # a loaded program has no source model: a new call signature is refused, naming the fix
    with pytest.raises(RuntimeError, match="saved with graphs for \\(input_ids\\)"):
        lm(input_ids=x, labels=x)
    lm.train(), cm.train()


def test_mlp_round_trip(tmp_path):
    cm = _mlp_model()
    cm.save_program(str(tmp_path / "mlp"))
    lm = lorafx.load_program(str(tmp_path / "mlp"))
    for batch in (1, 3, 7):
        x = torch.randn(batch, 16, generator=torch.Generator().manual_seed(batch))
        a, b = cm(x), lm(x)
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    loss_a, grads_a = _step(cm, lambda m: m(x).square().mean())
    loss_b, grads_b = _step(lm, lambda m: m(x).square().mean())
    assert torch.equal(loss_a, loss_b) and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    assert torch.equal(cm(x), lm(x))
    # the merged weights and the merged plain module are the compiled model's
    merged_c, merged_l = cm.merged_state_dict(), lm.merged_state_dict()
    assert merged_c.keys() == merged_l.keys() and all(torch.equal(merged_c[k], merged_l[k]) for k in merged_c)
    assert torch.equal(cm.merge_and_unload()(x), lm.merge_and_unload()(x))
    # a loaded program saves again, and that loads too
    lm.save_program(str(tmp_path / "again"))
    assert torch.equal(lorafx.load_program(str(tmp_path / "again"))(x), cm(x))
    # the archive pickles nothing but plain tensors (its sample inputs): no class of the user's model
    with zipfile.ZipFile(tmp_path / "mlp" / PROGRAM_NAME) as z:
        pickles = [n for n in z.namelist() if n.endswith(".pt")]
        assert pickles
        for name in pickles:
            with zipfile.ZipFile(io.BytesIO(z.read(name))) as inner:  # torch.save's zip format
                data = inner.read(next(n for n in inner.namelist() if n.endswith("data.pkl")))
            modules = {str(arg).split()[0] for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
            strings = [arg for op, arg, _ in pickletools.genops(data) if op.name.endswith("UNICODE")]
            assert all(m.startswith(("torch", "collections")) for m in modules), modules
            assert not any("MLP" in str(x) or "test_program_io" in str(x) for x in strings)
    manifest = json.loads((tmp_path / "mlp" / MANIFEST_NAME).read_text())
    assert manifest["lorafx_version"] == lorafx.__version__ and manifest["format"] == 1
    assert manifest["source"]["class"] == "MLP"


def test_save_refuses_to_replace_without_overwrite(tmp_path):
    cm = _mlp_model()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no lorafx program"):
        cm.save_program(str(tmp_path / "notes"), overwrite=True)
    assert os.listdir(tmp_path / "notes") == ["keep.txt"]
    cm.save_program(str(tmp_path / "p"))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        cm.save_program(str(tmp_path / "p"))
    with torch.no_grad():
        cm.fc1.lora_B.add_(1.0)
    cm.save_program(str(tmp_path / "p"), overwrite=True)
    lm = lorafx.load_program(str(tmp_path / "p"))
    assert torch.equal(lm.fc1.lora_B, cm.fc1.lora_B)
    assert sorted(os.listdir(tmp_path)) == ["notes", "p"]  # no staging folder left


def test_failed_save_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    cm = _mlp_model()
    target = tmp_path / "p"
    cm.save_program(str(target))
    before = {f: (target / f).read_bytes() for f in os.listdir(target)}
    real_save = torch.export.save

    def failing(ep, f, *args, **kwargs):
        real_save(ep, f, *args, **kwargs)  # a file is written, then the save fails
        raise OSError("disk full")

    monkeypatch.setattr(torch.export, "save", failing)
    with torch.no_grad():
        cm.fc2.lora_B.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        cm.save_program(str(target), overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        cm.save_program(str(tmp_path / "new"))
    assert {f: (target / f).read_bytes() for f in os.listdir(target)} == before
    assert sorted(os.listdir(tmp_path)) == ["p"]


def test_load_names_the_problem(tmp_path):
    cm = _mlp_model()
    with pytest.raises(FileNotFoundError, match="not a folder"):
        lorafx.load_program(str(tmp_path / "missing"))
    cm.save_adapter(str(tmp_path / "adapter_only"))
    with pytest.raises(FileNotFoundError, match="holds an adapter only"):
        lorafx.load_program(str(tmp_path / "adapter_only"))
    folder = tmp_path / "p"
    cm.save_program(str(folder))
    manifest_path = folder / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())

    # another lorafx version warns; a newer format is refused
    manifest_path.write_text(json.dumps({**manifest, "lorafx_version": "0.0.1"}))
    with pytest.warns(UserWarning, match="saved by lorafx 0.0.1"):
        lorafx.load_program(str(folder))
    manifest_path.write_text(json.dumps({**manifest, "format": 99}))
    with pytest.raises(ProgramFormatError, match="upgrade lorafx"):
        lorafx.load_program(str(folder))
    manifest_path.write_text("{not json")
    with pytest.raises(ProgramFormatError, match="not valid JSON"):
        lorafx.load_program(str(folder))
    manifest_path.write_text(json.dumps(manifest))

    # a truncated program, a changed one, a mixed adapter
    program = (folder / PROGRAM_NAME).read_bytes()
    (folder / PROGRAM_NAME).write_bytes(program[:-10])
    with pytest.raises(ProgramFormatError, match="truncated.*save the program again"):
        lorafx.load_program(str(folder))
    flipped = bytearray(program)
    flipped[len(flipped) // 2] ^= 0xFF
    (folder / PROGRAM_NAME).write_bytes(bytes(flipped))
    with pytest.raises(ProgramFormatError, match="sha256"):
        lorafx.load_program(str(folder))
    # an archive whose pickle holds an object (here a module of this file) is refused before torch unpickles it
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(program)) as src, zipfile.ZipFile(buffer, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith(".pt"):
                inner = io.BytesIO()
                torch.save(MLP(), inner)
                data = inner.getvalue()
            dst.writestr(item, data)
    (folder / PROGRAM_NAME).write_bytes(buffer.getvalue())
    manifest["files"][PROGRAM_NAME]["bytes"] = len(buffer.getvalue())
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ProgramFormatError, match="not plain tensors"):
        lorafx.load_program(str(folder), verify=False)
    (folder / PROGRAM_NAME).write_bytes(program)
    manifest["files"][PROGRAM_NAME]["bytes"] = len(program)
    with torch.no_grad():
        cm.fc1.lora_A.add_(1.0)
    cm.save_adapter(str(folder))  # an adapter from another state, its files listed with new sizes: refused
    manifest["files"]["adapter_model.safetensors"]["bytes"] = os.path.getsize(folder / "adapter_model.safetensors")
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ProgramFormatError, match="sha256|differs from the program"):
        lorafx.load_program(str(folder))
    with pytest.raises(ProgramFormatError, match="differs from the program's"):
        lorafx.load_program(str(folder), verify=False)


@pytest.mark.slow
def test_fresh_process_loads_without_model_code(tmp_path):
    cm = lorafx.compile(_llama(), example_inputs=(_ids(2, 8),), r=4, seed=0)
    randomise_lora_B(cm)
    cm.eval()
    cm.save_program(str(tmp_path / "p"))
    x = _ids(3, 11, seed=4)
    with torch.no_grad():
        torch.save({"x": x, "logits": cm(input_ids=x).logits}, tmp_path / "ref.pt")
    script = textwrap.dedent(f"""
        import sys, torch, lorafx
        lm = lorafx.load_program({str(tmp_path / 'p')!r})
        ref = torch.load({str(tmp_path / 'ref.pt')!r})
        with torch.no_grad():
            out = lm(input_ids=ref["x"])
        assert torch.equal(out.logits, ref["logits"]), "outputs differ"
        assert type(out).__name__ == "CausalLMOutputWithPast"
        models = sorted(m for m in sys.modules if m.startswith("transformers.models."))
        assert not models, models
        print("ok", type(lm).__name__)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ok LoadedLlamaForCausalLM" in run.stdout


@pytest.mark.slow
def test_every_signature_saved_weights_once(tmp_path):
    """A model called with labels saves that graph too: after load, the loss trains identically
    (under activation checkpointing, which the save keeps); the second program's weights are
    placeholders and both graphs read one set of tensors."""
    cm = lorafx.compile(_llama(), example_inputs=(_ids(2, 8),), r=4, seed=0)
    randomise_lora_B(cm)
    x = _ids(2, 8, seed=3)
    cm(input_ids=x, labels=x)
    cm.gradient_checkpointing_enable()  # kept by the save
    cm.save_program(str(tmp_path / "p"))
    manifest = json.loads((tmp_path / "p" / MANIFEST_NAME).read_text())
    assert [p["file"] for p in manifest["programs"]] == [PROGRAM_NAME, "program_1.pt2"]
    assert "model.embed_tokens.weight" in manifest["programs"][1]["shared"]
    lm = lorafx.load_program(str(tmp_path / "p"))
    assert lm.is_gradient_checkpointing
    first, second = lm._variants.values()
    assert first.model.embed_tokens.weight is second.model.embed_tokens.weight
    y = _ids(3, 7, seed=9)
    for _ in range(2):
        loss_a, grads_a = _step(cm, lambda m: m(input_ids=y, labels=y).loss)
        loss_b, grads_b = _step(lm, lambda m: m(input_ids=y, labels=y).loss)
        assert torch.equal(loss_a, loss_b) and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    with torch.no_grad():
        assert torch.equal(cm(input_ids=y).logits, lm(input_ids=y).logits)


@pytest.mark.slow
def test_batch_norm_model_saves_both_modes(tmp_path):
    cm = _mlp_model(batch_norm=True)
    cm.save_program(str(tmp_path / "p"))
    manifest = json.loads((tmp_path / "p" / MANIFEST_NAME).read_text())
    assert sorted(p["mode"] for p in manifest["programs"]) == [False, True]
    lm = lorafx.load_program(str(tmp_path / "p"))
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    for mode in (True, False, True):
        cm.train(mode), lm.train(mode)
        assert torch.equal(cm(x), lm(x)), mode  # train mode also updates the running statistics alike
    assert torch.equal(cm.state_dict()["norm.running_mean"], lm.state_dict()["norm.running_mean"])


@pytest.mark.slow
def test_merged_model_round_trip(tmp_path):
    cm = _mlp_model()
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    cm.eval()
    unmerged = cm(x)
    cm.merge()
    cm.save_program(str(tmp_path / "p"))
    assert cm.merged
    lm = lorafx.load_program(str(tmp_path / "p"))
    assert lm.merged and torch.equal(lm(x), cm(x))
    lm.unmerge()
    assert torch.equal(lm(x), unmerged)


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(shortcuts=True), dict(fold_a=True), dict(schedule_keep_xa=True),
                                     dict(sparsity=0.5, sparsity_method="magnitude"), dict(target="cim")],
                         ids=["shortcuts", "fold_a", "keep_xa", "sparsity", "cim"])
def test_rewritten_graphs_round_trip(tmp_path, options):
    """Shortcut, folded, keep-XA, sparse and CIM graphs: the same bits in train and eval mode,
    and the same lorafx notes on the op nodes (shape reads aside: torch.export re-creates them)."""
    from collections import Counter

    from lorafx.meta import describe

    cm = lorafx.compile(_llama(), example_inputs=(_ids(2, 8),), r=4, seed=0, **options)
    randomise_lora_B(cm)
    cm.save_program(str(tmp_path / "p"))
    lm = lorafx.load_program(str(tmp_path / "p"))
    x = _ids(3, 5, seed=1)
    for mode in (False, True):
        cm.train(mode), lm.train(mode)
        with torch.no_grad():
            torch.manual_seed(0)
            a = cm(input_ids=x).logits
            torch.manual_seed(0)
            assert torch.equal(a, lm(input_ids=x).logits), mode

    def notes(m):
        return Counter(describe(n) for gm in m._variants.values() for n in gm.graph.nodes
                       if n.op == "call_function" and "sym_size" not in str(n.target) and describe(n))

    assert notes(lm) == notes(cm)
    assert lm.lora_records() == cm.lora_records() and lm.shortcut_records().keys() == cm.shortcut_records().keys()
