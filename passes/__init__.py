"""lorafx passes: one file per pass, in the order lorafx.compile runs them."""
from .inline_subgraphs import InlineGradModeRegions
from .insert_lora import InsertLoRA, freeze_base
from .select_schedule import SelectSchedule
from .causal_mask import CausalMaskToIsCausal
from .recompute_inputs import RecomputeInputs
from .fuse_siblings import FuseSiblings
from .fold_lora import FoldLoRAIntoBase
from .cost_model import AnnotateCost
from .set_training_mode import SetTrainingMode, set_training_mode
from .merge_lora import MergeLoRA, UnmergeLoRA

__all__ = [
    "InlineGradModeRegions", "InsertLoRA", "SelectSchedule", "CausalMaskToIsCausal", "RecomputeInputs",
    "FuseSiblings", "FoldLoRAIntoBase", "AnnotateCost", "SetTrainingMode", "MergeLoRA", "UnmergeLoRA", "freeze_base",
    "set_training_mode",
]
