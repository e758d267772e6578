"""The dataset card of a token dataset (``README.md`` with its ``dataset_info``) and its upload."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..fileio import atomic_file

UPLOAD_PATTERNS = ["data/*.parquet", "README.md", "tokenization.json"]


def _describe(record: dict, location: str) -> str:
    """The settings of ``record`` (``tokenization.json``) in words, with the load-and-decode snippet."""
    model = record["model"]["name_or_path"]
    commit = record["model"].get("commit")
    h, w = record["token_grid"]
    views = ", ".join(f"`{v}`" for v in record["views"])
    resize = record.get("resize")
    lines = [
        "# Group-VQ tokens",
        "",
        (
            f"Token grids of `{record['dataset']}` ({record['split']} split) made with the Group-VQ tokenizer "
            f"`{model}`{f' (commit `{commit}`)' if commit else ''} at {record['resolution']}x{record['resolution']} "
            "pixels, by `scripts/tokenize_dataset.py` of groupvq-hf."
        ),
        "",
        f"- Codebook: {record['codebook_size']:,} codes in {record['num_groups']} group(s) "
        f"(group sizes {record['group_sizes']}).",
        "- Resize: "
        + (
            f"{resize['mode']} (Algorithm 2 of the Group-VQ paper) from the trained {resize['trained_codebook_size']:,} "
            f"codes, seed {resize['seed']}; decode with the model resized the same way."
            if resize
            else "none, the codebook as trained."
        ),
        f"- Token grid: {h} x {w} = {h * w} tokens per row, row-major (`tokens[i * {w} + j]` is row i, column j).",
        f"- Views per image (`--augment {record['augment']}`): {views}.",
        f"- Rows: {record['num_examples']:,}; images skipped (missing, undecodable or too small): {record['num_skipped']}"
        + (f" ({', '.join(f'{k}: {v}' for k, v in record['skipped'].items())})" if record["num_skipped"] else "")
        + ".",
        "",
        "Columns: `tokens` (int32 code indices), `key` (the source image's identifier), `augmentation` (the view)"
        + (", `label` (the source's class label)." if "label" in record.get("columns", ()) else "."),
        "",
        "## Load a row and decode it back to an image",
        "",
        "```python",
        "from datasets import load_dataset",
        "from groupvq_hf import GroupVQModel, decode_tokens",
        f'row = load_dataset("{location}", split="{record["split"]}")[0]',
        f'model = GroupVQModel.from_pretrained("{model}"{f", revision={commit!r}" if commit else ""})',
        *(
            [f"model.resize_codebook({record['codebook_size']}, mode=\"{resize['mode']}\", seed={resize['seed']})"
             "  # the codebook the tokens index"]
            if resize
            else []
        ),
        f"image = decode_tokens(model, row[\"tokens\"], token_grid={[h, w]})[0]  # a PIL image",
        "```",
        "",
        "`tokenization.json` beside the data holds the same settings as JSON.",
    ]
    return "\n".join(lines) + "\n"


def write_dataset_card(output_dir: str | Path, record: dict, features, location: str | None = None) -> Path:
    """Write ``README.md``: YAML metadata (``dataset_info`` from `datasets`: features, split sizes) and the settings
    in words, with the snippet loading from ``location`` (a repo id or folder; default
    ``output_dir``). Returns its path."""
    from datasets.info import DatasetInfo, DatasetInfosDict
    from datasets.splits import SplitDict, SplitInfo
    from huggingface_hub import DatasetCardData

    output_dir = Path(output_dir)
    split = record["split"]
    shards = sorted((output_dir / "data").glob(f"{split}-*.parquet"))
    num_bytes = sum(p.stat().st_size for p in shards)
    splits = SplitDict()
    splits.add(SplitInfo(name=split, num_bytes=num_bytes, num_examples=record["num_examples"]))
    info = DatasetInfo(features=features, splits=splits, download_size=num_bytes, dataset_size=num_bytes)
    data = DatasetCardData(tags=["group-vq", "image-tokens", "groupvq-hf"])
    DatasetInfosDict({"default": info}).to_dataset_card_data(data)
    # no `configs` naming the files: `datasets` finds the split from the file names (data/{split}-*.parquet), and a
    # local folder's cache then follows the files (with `configs`, datasets 5 reuses a stale cache after --overwrite)
    record = {**record, "columns": list(features)}
    # the text `DatasetCard(...).save` writes, without parsing the YAML back (0.3 s with ImageNet's 1,000 names)
    card = f"---\n{data.to_yaml()}\n---\n\n{_describe(record, location or str(output_dir))}"
    path = output_dir / "README.md"
    with atomic_file(path, single_writer=True) as tmp:
        tmp.write_text(card, encoding="utf-8")
    return path


# the split of a shard's path in a repo: this layout's `{split}-{rank:05d}-of-{world:05d}-{worker:03d}-{chunk:05d}` and
# the first release's `{split}-{rank:03d}-{worker:03d}-{chunk:05d}`
SHARD_SPLIT = re.compile(r"^data/(?P<split>.+?)-(?:\d{5}-of-\d{5}-\d{3}-\d{5}|\d{3}-\d{3}-\d{5})\.parquet$")


def check_push_target(repo_id: str, split: str, token: str | None = None) -> None:
    """Before any image is encoded: ValueError when the dataset repo ``repo_id`` holds shards of a split other
    than ``split``, is not a repo id, or cannot be listed (offline, no token...). A token repo holds one split: its card's ``dataset_info`` and its ``tokenization.json`` describe
    one run, and a push replaces the shards of its own split only (an earlier push of the same split, with another
    layout, would otherwise join it). A missing repo is fine (the push creates it)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    from ..hub import resolve_token

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"`push_to_hub` {repo_id!r} is not a repo id: {err}") from None
    try:
        files = HfApi(token=resolve_token(token)).list_repo_files(repo_id, repo_type="dataset")
    except RepositoryNotFoundError:
        return
    except Exception as err:  # noqa: BLE001  (offline, no token, no access...: a ValueError every process hears of)
        raise ValueError(f"`push_to_hub` {repo_id!r}: the repo could not be checked ({err}).") from err
    others = sorted({m["split"] for m in map(SHARD_SPLIT.match, files) if m and m["split"] != split})
    if others:
        raise ValueError(
            f"`push_to_hub` {repo_id!r} holds tokens of the split(s) {others}; a token dataset repo holds one split "
            f"(its card and tokenization.json describe one run): push the {split!r} split to another repo id."
        )


def push_tokens_to_hub(
    output_dir: str | Path, repo_id: str, split: str, private: bool = False, token: str | None = None
) -> str:
    """Upload the shards, card and ``tokenization.json`` of ``output_dir`` to the dataset repo ``repo_id``
    (created if missing) in one commit, replacing the repo's shards of ``split`` (`check_push_target` first);
    returns the repo URL."""
    from huggingface_hub import HfApi

    from ..hub import resolve_token

    token = resolve_token(token)
    check_push_target(repo_id, split, token)
    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(
        folder_path=str(output_dir), repo_id=repo_id, repo_type="dataset", allow_patterns=UPLOAD_PATTERNS,
        delete_patterns=[f"data/{split}-*.parquet"],  # an earlier push's shards (another layout) would join this split
        commit_message="Upload Group-VQ tokens (groupvq-hf scripts/tokenize_dataset.py)",
    )  # fmt: skip
    return str(url)


def read_record(output_dir: str | Path) -> dict:
    """``tokenization.json`` of a token dataset folder."""
    return json.loads((Path(output_dir) / "tokenization.json").read_text(encoding="utf-8"))


__all__ = ["UPLOAD_PATTERNS", "check_push_target", "push_tokens_to_hub", "read_record", "write_dataset_card"]
