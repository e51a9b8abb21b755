"""``AdapterTrainer``: the transformers ``Trainer`` saving a CompiledModel's adapters in PEFT's format.

A CompiledModel trains under the plain ``transformers.Trainer`` as it is (gradient
accumulation, mixed precision, ``gradient_checkpointing=True``, checkpoints and
``resume_from_checkpoint``).  But the plain Trainer saves a model that is neither a
``PreTrainedModel`` nor a ``PeftModel`` as its whole ``state_dict()`` in
``model.safetensors``: the frozen base included, in no format PEFT reads.  This
subclass changes only that: ``save_model`` and every checkpoint write the adapters in
PEFT's format (``cm.save_pretrained``: ``adapter_config.json`` +
``adapter_model.safetensors``, loadable by ``peft.PeftModel.from_pretrained`` and
``lorafx.load_adapter``), and resuming (``resume_from_checkpoint``,
``load_best_model_at_end``) loads them back; the optimizer, scheduler and RNG states
are the Trainer's own.  Any other model is saved and loaded as the Trainer does.

    trainer = lorafx.AdapterTrainer(model=cm, args=args, train_dataset=data)
    trainer.train()
    trainer.save_model("out")      # out/adapter_config.json, out/adapter_model.safetensors
"""
from __future__ import annotations

import os

import torch

from .adapter_io import CONFIG_NAME, SHORTCUTS_NAME, WEIGHTS_NAME
from .compiled import CompiledModel

__all__ = ["AdapterTrainer"]


def _compiled(trainer, model=None):
    """The CompiledModel the trainer trains (unwrapped), or None."""
    model = model if model is not None else trainer.model
    unwrapped = trainer.accelerator.unwrap_model(model, keep_torch_compile=False)
    return unwrapped if isinstance(unwrapped, CompiledModel) else None


def _holds_adapter(folder) -> bool:
    return folder is not None and os.path.isfile(os.path.join(folder, CONFIG_NAME)) and any(
        os.path.isfile(os.path.join(folder, name)) for name in (WEIGHTS_NAME, SHORTCUTS_NAME))


def _trainer_class():
    """``AdapterTrainer``, built on first use (importing transformers' Trainer is slow)."""
    cls = globals().get("AdapterTrainer")
    if cls is not None:
        return cls
    from transformers import Trainer
    from transformers.trainer import TRAINING_ARGS_NAME

    class AdapterTrainer(Trainer):
        """A ``transformers.Trainer`` that saves and resumes a CompiledModel's adapters in
        PEFT's format (see ``lorafx.training``); other models as the Trainer does."""

        def _save(self, output_dir=None, state_dict=None):
            cm = _compiled(self)
            if cm is None:
                return super()._save(output_dir, state_dict=state_dict)
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            if not self.args.should_save:
                return
            os.makedirs(output_dir, exist_ok=True)
            cm.save_pretrained(output_dir, state_dict=state_dict)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            cm = _compiled(self, model)
            if cm is None or not _holds_adapter(resume_from_checkpoint):
                return super()._load_from_checkpoint(resume_from_checkpoint, model=model)
            cm.load_adapter(resume_from_checkpoint)

        def _load_best_model(self):
            cm = _compiled(self)
            if cm is None or not _holds_adapter(self.state.best_model_checkpoint):
                return super()._load_best_model()
            cm.load_adapter(self.state.best_model_checkpoint)

    AdapterTrainer.__module__ = __name__
    globals()["AdapterTrainer"] = AdapterTrainer
    return AdapterTrainer


def __getattr__(name):
    if name == "AdapterTrainer":
        return _trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
