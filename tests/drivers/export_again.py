"""The export after a killed one (test_checkpoint_safety): run in the same folder, exports to out/model again."""

from groupvq_hf import GroupVQConfig, GroupVQModel
from groupvq_hf.training import save_export

save_export(GroupVQModel(GroupVQConfig.from_preset("tiny")), "out/model", {"seed": 2})
