"""A final export killed (SIGKILL) while `save_pretrained` writes inside its temporary folder (test_checkpoint_safety).

Run in the folder to write: exports a tiny model to out/model once, then dies inside the second export."""

import os, signal, torch  # noqa: E401, F401
from groupvq_hf import GroupVQConfig, GroupVQModel
from groupvq_hf.training import save_export

model = GroupVQModel(GroupVQConfig.from_preset("tiny"))
save_export(model, "out/model", {"seed": 0})
model.config.save_pretrained = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
save_export(model, "out/model", {"seed": 1})
