"""Every push of test_hub's `published` fixture in one process pointed at the local Hub server: scripts/push_to_hub.py
(accepted and refused cases), then transformers' and diffusers' own push_to_hub; writes a JSON report.

Usage: python hub_push.py PUSH_TO_HUB_SCRIPT MODEL_DIR EVAL_JSON STUDY_JSON REPORT_JSON"""

import json, os, runpy, sys
script, model_dir, eval_json, study_json, report_path = sys.argv[1:6]

def cli(*argv, token="hf_writer"):
    if token is None:
        os.environ.pop("HF_TOKEN", None)
    else:
        os.environ["HF_TOKEN"] = token
    sys.argv = ["push_to_hub.py", "--model", model_dir, *argv]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit:
        return str(exit.code)
    return "ok"

report = {
    "cli": cli("--repo_id", "tester/groupvq-tiny", "--eval_results", eval_json, "--resize_study", study_json,
               "--codebook_size", "512", "--resize_mode", "extend", "--datasets", "imagenet"),
    "cli_diffusers": cli("--repo_id", "groupvq-org/groupvq-tiny-diffusers", "--diffusers", "--private"),
    "no_token": cli("--repo_id", "tester/x", token=None),
    "invalid_token": cli("--repo_id", "tester/x", token="hf_bogus"),
    "read_only": cli("--repo_id", "reader/x", token="hf_reader"),
    "foreign_namespace": cli("--repo_id", "someone-else/x"),
    "refused_new": cli("--repo_id", "scoped/x", token="hf_scoped"),
    "refused_existing": cli("--repo_id", "tester/groupvq-tiny", token="hf_scoped"),
}
os.environ["HF_TOKEN"] = "hf_writer"
from groupvq_hf import GroupVQModel, GroupVQVAE
model = GroupVQModel.from_pretrained(model_dir)
report["cli_card_first"] = cli("--repo_id", "tester/native")  # the card; push_to_hub below must keep it
model.push_to_hub("tester/native")                         # transformers' own push_to_hub
GroupVQVAE.from_groupvq(model).push_to_hub("tester/native-diffusers")  # diffusers' own push_to_hub
json.dump(report, open(report_path, "w"))
