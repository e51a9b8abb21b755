"""save_adapter / load_adapter never corrupt the user's files and explain bad ones.

* a failure at any filesystem step of a save leaves the previous adapter byte-identical
  and no staging files (fault injection), and a crash between the two renames is caught
  on load;
* overwrite=False refuses to replace an adapter, overwrite=True logs that it did;
* a file, or a model compiled on the meta device, is refused before anything is written;
* corrupt or truncated config/weights files are refused, before compiling, with the fix;
* PEFT .bin pickles: refused with weights_only=True unless trust_pickle=True;
* loading copies nothing unless the whole adapter fits.
"""
import hashlib
import itertools
import json
import os
import shutil

import pytest
import safetensors.torch
import torch

import lorafx
import lorafx.compiler
from lorafx import adapter_io
from lorafx.adapter_io import CONFIG_NAME, WEIGHTS_NAME
from conftest import Faults, Warnings, folder_snapshot, restore

X_IN = (torch.randn(2, 8, generator=torch.Generator().manual_seed(0)),)
BIN_NAME = "adapter_model.bin"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def compiled(model):
    return lorafx.compile(model, example_inputs=X_IN, r=2, seed=0)


def fill(cm, value):
    """Give every adapter parameter distinct values, shifted by ``value``."""
    with torch.no_grad():
        for i, p in enumerate(cm.trainable_parameters().values()):
            p.copy_(torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) * 0.01 + value + i)
    return adapters(cm)


def adapters(cm):
    return {n: p.detach().clone() for n, p in cm.trainable_parameters().items()}


def assert_adapters(cm, want):
    got = adapters(cm)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.fixture
def no_compile(monkeypatch):
    """lorafx.load_adapter must refuse a bad adapter without compiling."""
    def refuse(*args, **kwargs):
        raise AssertionError("compiled before checking the adapter files")

    monkeypatch.setattr(lorafx.compiler, "compile", refuse)


# -- 1. atomic save -----------------------------------------------------------------------
@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "no-hard-links"])
def test_a_failure_at_any_step_leaves_the_previous_adapter(model, tmp_path, monkeypatch, links):
    cm, probe = compiled(model), compiled(model)
    folder = tmp_path / "checkpoint-10"
    want_x = fill(cm, 1.0)
    cm.save_adapter(str(folder))
    (folder / "trainer_state.json").write_text('{"step": 10}')  # a Trainer checkpoint's other files stay
    (folder / "optimizer").mkdir()
    x_files = folder_snapshot(folder)
    want_y = fill(cm, 5.0)
    failed, survived = set(), set()  # the steps whose fault failed the save / the save worked around
    for k in itertools.count():
        restore(folder, x_files)
        faults = Faults(k, links)
        with monkeypatch.context() as m:
            faults.install(m)
            try:
                cm.save_adapter(str(folder))
                error = None
            except OSError as e:
                error = e
        if error is not None:
            assert "injected fault" in str(error)
            failed.add(faults.calls[k])
            assert folder_snapshot(folder) == x_files, f"fault in {faults.calls[k]} changed the folder"
            probe.load_adapter(str(folder))
            assert_adapters(probe, want_x)
        else:  # saved: no fault fired, or the save worked around it (hard link -> copy, fsync of the folder)
            assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors",
                                                  "optimizer", "trainer_state.json"]
            probe.load_adapter(str(folder))
            assert_adapters(probe, want_y)
            if not faults.fired:
                break
            survived.add(faults.calls[k])
    assert {"os.replace", "os.makedirs", "os.fsync", "tempfile.mkdtemp", "json.dump",
            "safetensors.torch.save_file", "lorafx.adapter_io.open"} <= failed
    assert ("os.link" in survived) if links else ("shutil.copy2" in failed)


def test_a_failed_undo_keeps_the_old_files_and_says_where(model, tmp_path, monkeypatch):
    """If putting the old adapter back fails too, its backup is kept and named."""
    cm = compiled(model)
    fill(cm, 1.0)
    cm.save_adapter(str(tmp_path))
    x_files = folder_snapshot(tmp_path)
    fill(cm, 5.0)
    real_replace, calls = os.replace, []

    def replace_once(src, dst):  # the weights get in, then every rename fails
        calls.append(dst)
        if len(calls) > 1:
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_once)
    with pytest.raises(OSError, match="putting the previous adapter back failed") as info:
        cm.save_adapter(str(tmp_path))
    monkeypatch.undo()
    stage = [n for n in os.listdir(tmp_path) if n.startswith(".")]
    assert len(stage) == 1 and stage[0] in str(info.value)
    with open(tmp_path / stage[0] / (WEIGHTS_NAME + ".old"), "rb") as fh:
        assert fh.read() == x_files[WEIGHTS_NAME]


def test_config_and_weights_from_different_saves_are_refused(model, tmp_path, no_compile):
    """A crash between the two renames leaves new weights beside the old config."""
    peft = pytest.importorskip("peft")
    cm = compiled(model)
    fill(cm, 1.0)
    cm.save_adapter(str(tmp_path / "x"))
    other = lorafx.compile(model, example_inputs=X_IN, r=2, alpha=4, seed=0)  # same shapes, other scale
    fill(other, 5.0)
    other.save_adapter(str(tmp_path / "y"))
    cm.load_adapter(str(tmp_path / "x"))  # each save alone loads
    # the pairing lives in the weights' metadata: PEFT warns about unknown config keys
    config = json.loads((tmp_path / "x" / CONFIG_NAME).read_text())
    assert set(config) <= set(peft.LoraConfig.__dataclass_fields__)
    shutil.copyfile(tmp_path / "y" / WEIGHTS_NAME, tmp_path / "x" / WEIGHTS_NAME)
    before = adapters(cm)
    with pytest.raises(ValueError, match=r"x come from different saves .*save the adapter again"):
        cm.load_adapter(str(tmp_path / "x"))
    assert_adapters(cm, before)
    with pytest.raises(ValueError, match="different saves"):
        lorafx.load_adapter(model, str(tmp_path / "x"), example_inputs=X_IN)


# -- 2. overwrite -------------------------------------------------------------------------
def test_overwrite(model, tmp_path):
    cm, probe = compiled(model), compiled(model)
    folder = tmp_path / "adapter"
    want_x = fill(cm, 1.0)
    with Warnings() as logged:
        cm.save_adapter(str(folder), overwrite=False)  # nothing there yet
    assert not logged
    x_files = folder_snapshot(folder)
    want_y = fill(cm, 5.0)
    with pytest.raises(FileExistsError, match=r"adapter.*overwrite=True"):
        cm.save_adapter(str(folder), overwrite=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        lorafx.save_adapter(cm, str(folder), overwrite=False)
    assert folder_snapshot(folder) == x_files
    probe.load_adapter(str(folder))
    assert_adapters(probe, want_x)

    with Warnings() as logged:
        cm.save_adapter(str(folder))
    assert len(logged) == 1
    assert "replaced" in logged[0].getMessage() and str(folder) in logged[0].getMessage()
    probe.load_adapter(str(folder))
    assert_adapters(probe, want_y)


# -- 3. a file, 4. a meta-device model: refused before writing ------------------------------
def test_saving_to_a_file_is_refused(model, tmp_path):
    cm = compiled(model)
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(b"not yours to replace")
    with pytest.raises(NotADirectoryError, match=r"adapter\.safetensors.*folder"):
        cm.save_adapter(str(path))
    assert path.read_bytes() == b"not yours to replace"
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors"]


def test_a_meta_device_model_has_nothing_to_save(tmp_path):
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    cm = lorafx.compile(model, example_inputs=(torch.randn(2, 8, device="meta"),), r=2, seed=0)
    with pytest.raises(ValueError, match=r"meta device.*nothing to save.*real weights"):
        cm.save_adapter(str(tmp_path / "adapter"))
    assert not os.path.exists(tmp_path / "adapter")


# -- 5. corrupt config, 6. corrupt weights: refused before compiling ---------------------
def _saved(model, directory):
    cm = compiled(model)
    fill(cm, 1.0)
    cm.save_adapter(str(directory))
    return cm


CONFIG_DAMAGE = {
    "truncated": lambda good: good[: len(good) // 2],
    "empty": lambda good: b"",
    "binary": lambda good: bytes(range(256)),
    "list": lambda good: b"[1, 2]",
    "string": lambda good: b'"LORA"',
}


@pytest.mark.parametrize("damage", CONFIG_DAMAGE)
def test_a_corrupt_config_is_refused(model, tmp_path, no_compile, damage):
    cm = _saved(model, tmp_path)
    path = tmp_path / CONFIG_NAME
    path.write_bytes(CONFIG_DAMAGE[damage](path.read_bytes()))
    before = adapters(cm)
    for load in (lambda: cm.load_adapter(str(tmp_path)),
                 lambda: lorafx.load_adapter(model, str(tmp_path), example_inputs=X_IN),
                 lambda: adapter_io.read_adapter_config(str(tmp_path))):
        with pytest.raises(ValueError, match=r"adapter_config\.json.*corrupt or truncated.*save or download"):
            load()
    assert_adapters(cm, before)


WEIGHTS_DAMAGE = {
    "truncated": lambda good: good[:-5],
    "header only": lambda good: good[:40],
    "empty": lambda good: b"",
    "random": lambda good: bytes(range(256)) * 4,
}


@pytest.mark.parametrize("damage", WEIGHTS_DAMAGE)
def test_corrupt_weights_are_refused_before_compiling(model, tmp_path, no_compile, damage):
    cm = _saved(model, tmp_path)
    path = tmp_path / WEIGHTS_NAME
    path.write_bytes(WEIGHTS_DAMAGE[damage](path.read_bytes()))
    before = adapters(cm)
    for load in (lambda: cm.load_adapter(str(tmp_path)),
                 lambda: lorafx.load_adapter(model, str(tmp_path), example_inputs=X_IN)):
        with pytest.raises(ValueError, match=r"adapter_model\.safetensors.*corrupt or truncated.*save or download"):
            load()
    assert_adapters(cm, before)


# -- 7. PEFT .bin pickles -------------------------------------------------------------------
class Box(dict):
    """A dict subclass: torch's weights_only unpickler refuses it."""


def _bin_adapter(model, directory, wrap):
    """A lorafx-saved config beside a .bin holding ``wrap(tensors)``; the tensors."""
    _saved(model, directory)
    tensors = safetensors.torch.load_file(str(directory / WEIGHTS_NAME))
    os.remove(directory / WEIGHTS_NAME)
    torch.save(wrap(tensors), str(directory / BIN_NAME))
    return {f"{k[len('base_model.model.'):-len('.weight')]}": v for k, v in tensors.items()}


def test_a_bin_with_other_objects_needs_trust_pickle(model, tmp_path, no_compile):
    want = _bin_adapter(model, tmp_path, Box)
    cm = compiled(model)
    fill(cm, 9.0)
    before = adapters(cm)
    for load in (lambda: cm.load_adapter(str(tmp_path)),
                 lambda: lorafx.load_adapter(model, str(tmp_path), example_inputs=X_IN)):
        with pytest.raises(ValueError, match=r"adapter_model\.bin is a pickle .*weights_only=True.*safetensors"
                                             r".*trust_pickle=True"):
            load()
    assert_adapters(cm, before)
    cm.load_adapter(str(tmp_path), trust_pickle=True)
    assert_adapters(cm, want)


def test_lorafx_load_adapter_passes_trust_pickle(model, tmp_path):
    want = _bin_adapter(model, tmp_path, Box)
    cm = lorafx.load_adapter(model, str(tmp_path), example_inputs=X_IN, trust_pickle=True)
    assert_adapters(cm, want)


def test_a_plain_tensor_bin_loads_without_trust_pickle(model, tmp_path):
    want = _bin_adapter(model, tmp_path, dict)
    cm = compiled(model)
    cm.load_adapter(str(tmp_path))
    assert_adapters(cm, want)
    assert_adapters(lorafx.load_adapter(model, str(tmp_path), example_inputs=X_IN), want)


# -- 8. all or nothing -------------------------------------------------------------------------
def _wrong_shape(tensors):
    tensors["base_model.model.2.lora_B.weight"] = torch.zeros(5, 2)


def _half_site(tensors):
    del tensors["base_model.model.2.lora_B.weight"]


def _extra_site(tensors):
    tensors["base_model.model.9.lora_A.weight"] = torch.zeros(2, 8)
    tensors["base_model.model.9.lora_B.weight"] = torch.zeros(8, 2)


@pytest.mark.parametrize("edit,match", [(_wrong_shape, r"2: adapter shapes"), (_half_site, r"2 has only lora_A"),
                                        (_extra_site, r"weights without a site \['9'\]")])
def test_a_bad_site_copies_nothing(model, tmp_path, edit, match):
    """The first site fits, a later one does not: no site is copied."""
    _saved(model, tmp_path)
    path = str(tmp_path / WEIGHTS_NAME)
    tensors = safetensors.torch.load_file(path)
    edit(tensors)
    with safetensors.safe_open(path, "pt") as f:
        metadata = f.metadata()  # keeps the config pairing
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    assert metadata[adapter_io.PAIRING_KEY] == hashlib.sha256((tmp_path / CONFIG_NAME).read_bytes()).hexdigest()
    cm = compiled(model)
    before = fill(cm, 9.0)
    with pytest.raises(ValueError, match=match):
        cm.load_adapter(str(tmp_path))
    assert_adapters(cm, before)
