"""A CompiledModel trains with the transformers Trainer."""
import torch

import lorafx

from conftest import ids


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=12):
        self.x = ids(1, seq, seed=1).repeat(n, 1)  # one sequence: the loss must fall

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "attention_mask": torch.ones_like(self.x[i]), "labels": self.x[i]}


def test_trainer_trains_the_adapters(tiny_model, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_model("llama")
    cm = lorafx.compile(model, example_inputs=(ids(2, 12),), r=4)
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
