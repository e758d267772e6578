"""scripts/tokenize_dataset.py's code with --push_to_hub, then the pushed rows loaded back from the Hub (test_tokens).

Usage: python tokens_push_and_load.py TOKENIZE_DATASET_ARGS...; prints `ROWS <json>` and `URL <hub url>`"""

import json, sys
import datasets
datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
from groupvq_hf.tokens import tokenization
sys.argv = ["tokenize_dataset.py", *sys.argv[1:]]
record = tokenization.main()
rows = datasets.load_dataset("tester/demo-tokens", split="validation")
print("ROWS", json.dumps(sorted([r["key"], r["augmentation"], r["tokens"]] for r in rows)))
print("URL", record["hub_url"])
