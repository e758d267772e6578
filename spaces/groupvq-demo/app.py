"""Hugging Face Space: the Group-VQ tokenizer demo page (`groupvq_hf.app.build_demo`).

The model is `GROUPVQ_MODEL` (a Space variable: a Hub repo id or a folder), by default the `model/` folder beside
this file. `GROUPVQ_TRUST_REMOTE_CODE=1` loads it through `AutoModel` with the code saved in the repo.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# In the Space a copy of `src/groupvq_hf` sits beside this file; inside the repository it is ../../src.
for root in (HERE, os.path.join(HERE, "..", "..", "src")):
    if os.path.isdir(os.path.join(root, "groupvq_hf")):
        sys.path.insert(0, os.path.abspath(root))
        break
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from groupvq_hf.app import MAX_FILE_SIZE, build_demo  # noqa: E402

demo = build_demo(
    os.environ.get("GROUPVQ_MODEL", os.path.join(HERE, "model")),
    trust_remote_code=os.environ.get("GROUPVQ_TRUST_REMOTE_CODE") == "1",
)

if __name__ == "__main__":
    demo.launch(max_file_size=MAX_FILE_SIZE)
