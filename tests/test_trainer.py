"""A CompiledModel trains with the transformers Trainer."""
import copy
import os

import pytest
import torch

import lorafx

from conftest import ids, randomise_lora_B


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=12):
        self.x = ids(1, seq, seed=1).repeat(n, 1)  # one sequence: the loss must fall

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "attention_mask": torch.ones_like(self.x[i]), "labels": self.x[i]}


def test_trainer_trains_the_adapters(llama_r4, tmp_path):
    from transformers import Trainer, TrainingArguments

    cm = copy.deepcopy(llama_r4)
    before = {n: p.detach().clone() for n, p in cm.trainable_parameters().items()}
    frozen = cm.state_dict()["model.layers.0.self_attn.q_proj.weight"].clone()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1,
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=cm, args=args, train_dataset=_Tokens())
    result = trainer.train()
    assert result.global_step == 4
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]
    changed = [n for n, p in cm.trainable_parameters().items() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    assert torch.equal(cm.state_dict()["model.layers.0.self_attn.q_proj.weight"], frozen)


# -- saving, accumulation, checkpoints and resume -----------------------------------------------------
class _Labelled(torch.utils.data.Dataset):
    """16 different sequences; some labels masked (-100), so token counts differ between batches."""

    def __init__(self, n=16, seq=12):
        self.x = ids(n, seq, seed=1)
        self.labels = self.x.clone()
        self.labels[::3, :4] = -100

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.labels[i]}


def _args(out, **kw):
    from transformers import TrainingArguments
    base = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True, seed=0, data_seed=0)
    return TrainingArguments(**{**base, **kw})


def _train(model, out, resume=None, **kw):
    cm = lorafx.compile(model, example_inputs=(ids(2, 12),), r=4, seed=0)
    trainer = lorafx.AdapterTrainer(model=cm, args=_args(out, **kw), train_dataset=_Labelled())
    trainer.train(resume_from_checkpoint=resume)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return cm, trainer, losses


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_save_model_writes_a_peft_adapter(tiny_model, llama_r4, tmp_path):
    """AdapterTrainer.save_model (and cm.save_pretrained) write PEFT's format: PEFT and lorafx load it
    and give the compiled model's outputs; nothing else of the model is written."""
    import peft

    model = tiny_model("llama")
    cm, blank = copy.deepcopy(llama_r4), copy.deepcopy(llama_r4)
    randomise_lora_B(cm, scale=0.2)
    trainer = lorafx.AdapterTrainer(model=cm, args=_args(tmp_path / "run"))
    trainer.save_model(str(tmp_path / "final"))
    files = set(os.listdir(tmp_path / "final"))
    assert {"adapter_config.json", "adapter_model.safetensors", "training_args.bin"} <= files
    assert "model.safetensors" not in files
    x = ids(2, 12, seed=3)
    with torch.no_grad():
        want = cm(input_ids=x).logits
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "final"))
        assert torch.allclose(loaded(input_ids=x).logits, want, atol=1e-5)
        assert not torch.allclose(blank(input_ids=x).logits, want, atol=1e-4)
        assert lorafx.load_adapter(blank, str(tmp_path / "final")) is blank
        assert torch.allclose(blank(input_ids=x).logits, want, atol=1e-6)
    # a gathered state dict (what the Trainer passes under FSDP/DeepSpeed) supplies the values
    state = {k: (torch.zeros_like(v) if k.endswith("lora_B") else v) for k, v in cm.state_dict().items()}
    cm.save_pretrained(str(tmp_path / "zeros"), state_dict=state)
    with torch.no_grad():
        zeroed = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "zeros"))
        assert torch.allclose(zeroed(input_ids=x).logits, model(input_ids=x).logits, atol=1e-6)
    with pytest.raises(KeyError, match="lora_A"):
        cm.save_pretrained(str(tmp_path / "bad"), state_dict={})
    assert not os.path.exists(tmp_path / "bad" / "adapter_config.json")


@pytest.mark.slow
def test_gradient_accumulation_matches_a_larger_batch(tiny_model, tmp_path):
    """gradient_accumulation_steps=2 with batch 2 gives batch 4's losses and adapters (labels partly masked:
    the Trainer's num_items_in_batch normalises across micro-batches, a tensor input, so no re-capture)."""
    model = tiny_model("llama")
    big, _, big_losses = _train(model, tmp_path / "big", max_steps=3)
    acc, _, acc_losses = _train(model, tmp_path / "acc", max_steps=3, per_device_train_batch_size=2,
                                gradient_accumulation_steps=2)
    assert acc_losses == pytest.approx(big_losses, abs=1e-5)
    assert _max_diff(big.trainable_parameters(), acc.trainable_parameters()) < 1e-4
    assert len(acc._variants) == 2  # input_ids (compile) + the Trainer's (input_ids, labels, num_items_in_batch)


@pytest.mark.slow
def test_checkpoints_hold_peft_adapters_and_resume_exactly(tiny_model, tmp_path):
    """save_strategy="steps" checkpoints hold the adapter in PEFT's format; resuming from one gives the
    adapters of the uninterrupted run (optimizer, scheduler and RNG state restored by the Trainer)."""
    import peft

    model = tiny_model("llama")
    full, _, full_losses = _train(model, tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2)
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
            "rng_state.pth"} <= set(os.listdir(ckpt))
    assert "model.safetensors" not in os.listdir(ckpt)
    peft.PeftModel.from_pretrained(copy.deepcopy(model), str(ckpt))  # PEFT reads it
    resumed, trainer, losses = _train(model, tmp_path / "run", resume=str(ckpt), max_steps=4,
                                      save_strategy="steps", save_steps=2)
    assert trainer.state.global_step == 4
    assert losses[2:] == pytest.approx(full_losses[2:], abs=1e-6)  # (the first two: the checkpoint's log)
    assert _max_diff(full.trainable_parameters(), resumed.trainable_parameters()) == 0.0


# -- accelerate ---------------------------------------------------------------------------------------
def _steps(cm, batches, accumulate, accelerator=None):
    """AdamW over ``batches``, one optimizer step per ``accumulate`` micro-batches; the losses."""
    opt = torch.optim.AdamW(list(cm.trainable_parameters().values()), lr=1e-2)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    if accelerator is not None:
        cm, opt, loader = accelerator.prepare(cm, opt, loader)
    losses = []
    for i, batch in enumerate(loader):
        if accelerator is not None:
            with accelerator.accumulate(cm):
                loss = cm(**batch).loss
                accelerator.backward(loss)
                opt.step()
                opt.zero_grad()
        else:
            loss = cm(**batch).loss / accumulate
            loss.backward()
            if (i + 1) % accumulate == 0:
                opt.step()
                opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_accelerate_prepare_accumulate_and_unwrap(llama_r4):
    """accelerate's prepare / backward / accumulate train a CompiledModel exactly like a plain loop with
    the same accumulation, and unwrap_model gives the CompiledModel back."""
    from accelerate import Accelerator

    cm = copy.deepcopy(llama_r4)
    randomise_lora_B(cm, scale=0.1)
    batches = [{"input_ids": ids(2, 12, seed=s), "labels": ids(2, 12, seed=s)} for s in range(4)]
    plain, accel = copy.deepcopy(cm), copy.deepcopy(cm)
    want = _steps(plain, batches, accumulate=2)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    got = _steps(accel, batches, accumulate=2, accelerator=accelerator)
    assert accelerator.unwrap_model(accel) is accel
    assert got == pytest.approx([w * 2 for w in want], abs=1e-6)  # (the plain loop logs loss / 2)
    diff = _max_diff(plain.trainable_parameters(), accel.trainable_parameters())
    assert diff < 1e-6
    assert _max_diff(cm.trainable_parameters(), accel.trainable_parameters()) > 1e-3  # it trained
