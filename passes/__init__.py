"""lorafx passes: one file per pass."""
from .cost_model import AnnotateCost
from .inline_subgraphs import InlineGradModeRegions
from .insert_lora import InsertLoRA, freeze_base
from .merge_lora import MergeLoRA, UnmergeLoRA
from .set_training_mode import SetTrainingMode, set_training_mode
from .select_schedule import SelectSchedule  # noqa: F401

__all__ = ["InlineGradModeRegions", "InsertLoRA", "MergeLoRA", "UnmergeLoRA", "SetTrainingMode", "freeze_base", "set_training_mode"]
__all__ += ["AnnotateCost"]
from .causal_mask import CausalMaskToIsCausal  # noqa: E402
__all__ += ["CausalMaskToIsCausal"]
from .recompute_inputs import RecomputeInputs  # noqa: E402
__all__ += ["RecomputeInputs"]
from .fuse_siblings import FuseSiblings  # noqa: E402
__all__ += ["FuseSiblings"]
