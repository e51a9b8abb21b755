"""lorafx passes: one file per pass, in the order lorafx.compile runs them."""
from .inline_subgraphs import InlineGradModeRegions
from .prune_weights import PruneWeights
from .allocate_ranks import AllocateRanks
from .modules_to_save import ModulesToSave
from .insert_lora import InsertLoRA, freeze_base
from .insert_shortcuts import InsertShortcuts
from .trainable_tokens import TrainableTokens
from .apply_sparsity import ApplySparsity
from .select_schedule import SelectSchedule
from .causal_mask import CausalMaskToIsCausal
from .recompute_inputs import RecomputeInputs
from .fuse_siblings import FuseSiblings
from .fold_lora import FoldLoRAIntoBase
from .cost_model import AnnotateCost
from .set_training_mode import SetTrainingMode, set_training_mode
from .merge_lora import MergeLoRA, UnmergeLoRA
from .partition_to_targets import PartitionToTargets
from .program_chip import ProgramChip
from .halora import HaLoRA
from .checkpoint_layers import CheckpointLayers

# The default pipeline of lorafx.compile, in order; each pass is built from the compile
# options it declares (Pass.from_options: None leaves it out), the target's passes
# (Target.passes) go between DEFAULT_PASSES and FINAL_PASSES.  PruneWeights (with sparsity=)
# prunes first, so that ranks are scored on the pruned model; ApplySparsity makes the adapters
# on pruned weights sparse before any pass picks schedules or rewrites lora_linear.  AllocateRanks (with
# rank_budget) decides the ranks InsertLoRA and InsertShortcuts (with shortcuts=True) use.
# ModulesToSave (with modules_to_save=) makes whole modules trainable before InsertLoRA, which then
# leaves them unadapted (PEFT's rule); TrainableTokens (with trainable_token_indices=) comes after
# the passes that freeze every parameter they find (InsertLoRA, InsertShortcuts).
# RecomputeInputs takes the adapters whose input is cheap to rebuild, FoldLoRAIntoBase then
# the ones it left, FuseSiblings groups the rest; AnnotateCost runs after every rewrite so
# that its records describe the final graph.  The cim target's passes (PartitionToTargets,
# ProgramChip, HaLoRA: lorafx.hw_targets.cim) are not in these lists: the target adds them.
DEFAULT_PASSES = (InlineGradModeRegions, PruneWeights, AllocateRanks, ModulesToSave, InsertLoRA, InsertShortcuts,
                  TrainableTokens, ApplySparsity,
                  SelectSchedule, CausalMaskToIsCausal, RecomputeInputs, FoldLoRAIntoBase, FuseSiblings)
FINAL_PASSES = (AnnotateCost, SetTrainingMode)

__all__ = [
    "InlineGradModeRegions", "PruneWeights", "AllocateRanks", "ModulesToSave", "ApplySparsity", "InsertLoRA", "InsertShortcuts", "TrainableTokens", "SelectSchedule",
    "CausalMaskToIsCausal", "RecomputeInputs", "FuseSiblings", "FoldLoRAIntoBase", "AnnotateCost", "SetTrainingMode", "MergeLoRA", "UnmergeLoRA", "freeze_base",
    "set_training_mode", "DEFAULT_PASSES", "FINAL_PASSES", "PartitionToTargets", "ProgramChip", "HaLoRA",
    "CheckpointLayers",
]
