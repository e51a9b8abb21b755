"""lorafx passes: one file per pass."""
from .insert_lora import InsertLoRA, freeze_base
from .merge_lora import MergeLoRA, UnmergeLoRA
from .set_training_mode import SetTrainingMode, set_training_mode

__all__ = ["InsertLoRA", "MergeLoRA", "UnmergeLoRA", "SetTrainingMode", "freeze_base", "set_training_mode"]
