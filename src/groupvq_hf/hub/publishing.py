"""Publishing a Group-VQ tokenizer on the Hugging Face Hub.

`render_model_card` fills `model_cards/groupvq.md` (metadata, model-index from `scripts/evaluate.py` results, codebook,
training recipe, loading, resizing, citation; the results are read and formatted by `groupvq_hf.hub.cards`, as
`scripts/evaluate.py --model_card` does); `publish` saves the model (safetensors, `config.json` with `auto_map`, the
remote-code files, `preprocessor_config.json`) and the card into a folder and uploads it with `HfApi.upload_folder`,
after checking the token can write to the repo. Only files matching `ALLOW_PATTERNS` and none of `IGNORE_PATTERNS`
are uploaded: never optimizer states, pickles or tokens.

Network failures (a refused or dropped connection, an endpoint that never answers) raise `HubConnectionError`, one line
naming the endpoint, after at most `timeout` seconds per request (`hub_timeout`). The upload is one commit: a failed
one changes nothing on the Hub, and running `publish` again completes it. Its command line is
`groupvq_hf.hub.cli.publish_main` (`scripts/push_to_hub.py`, `groupvq-push-to-hub`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalTokenNotFoundError,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects, validate_repo_id

from ..configuration_groupvq import GroupVQConfig
from ..data.sources import parse_dataset_spec
from ..fileio import atomic_directory
from ..image_processing_groupvq import GroupVQImageProcessor
from ..modeling_groupvq import GroupVQModel
from ..quantizer import RESIZE_MODES
from ..training.finetune import DISCRIMINATOR_FILE, discriminator_settings, load_discriminator
from .cards import (
    DATASET_NAMES,
    METRICS,
    dataset_id,
    describe_recipe,
    model_index_entries,
    normalize_eval_results,
    read_json,
    resize_study_markdown,
)

CARD_TEMPLATE = Path(__file__).resolve().parent / "model_cards" / "groupvq.md"  # a link to <repo>/model_cards
ALLOW_PATTERNS = ["README.md", "*.json", "*.safetensors", "*.py"]
IGNORE_PATTERNS = [
    "*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.npy", "*.npz",  # pickles and raw arrays
    "*optimizer*", "*scheduler*", "*random_states*", "*rng_state*", "*scaler*", "*trainer_state*",  # training state
    "*training_state*",
    "*token*", ".git*", "*/.git*", ".cache/*", "*/__pycache__/*", "__pycache__/*", "checkpoint*",  # secrets, caches
]
BASE_TAGS = ["groupvq", "vector-quantization", "image-tokenizer", "vqgan"]

PICKLE_PROTOCOLS = (b"\x02", b"\x03", b"\x04", b"\x05")  # second byte of a pickle after the PROTO opcode 0x80


# Seconds a Hub request may wait to connect, to send, or between two reads of the answer (not the whole upload).
DEFAULT_TIMEOUT = 60.0


class HubAccessError(PermissionError):
    """The token cannot write to the repository (read-only token, foreign namespace, invalid token)."""


class HubConnectionError(ConnectionError):
    """The Hub endpoint refused or dropped the connection, or did not answer within the timeout."""


# ---------------------------------------------------------------------------------------------------------- network
def check_timeout(timeout) -> float:
    """`timeout` as a positive finite float, else ValueError."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"`timeout` must be a positive number of seconds, got {timeout!r}.")
    return float(timeout)


@contextlib.contextmanager
def hub_timeout(timeout: float = DEFAULT_TIMEOUT):
    """Inside the block every request huggingface_hub sends through its shared client (`get_session`) waits at most
    `timeout` seconds to connect, to send, and between reads of the answer (huggingface_hub's own client has no
    timeout). Uses `huggingface_hub.set_client_factory` over the factory in place (a user's proxy or certificate
    setup is kept); that factory is restored on exit. (Downloads take
    HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT.)"""
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    timeout = check_timeout(timeout)

    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)  # a user's proxy setup, say

    def client_with_timeout():
        client = previous()
        client.timeout = timeout  # httpx: connect, read, write and pool timeouts
        return client

    set_client_factory(client_with_timeout)
    try:
        yield
    finally:
        set_client_factory(previous)


def network_failure(err: BaseException, endpoint: str, timeout: float) -> str | None:
    """One line naming `endpoint` and the failure when `err` is an httpx transport error (huggingface_hub's client
    raises them as they are: refused, dropped, timed out); None for anything else."""
    kinds = {c.__name__ for c in type(err).__mro__ if c.__module__.split(".")[0] in ("httpx", "httpx2")}
    if "TransportError" not in kinds:
        return None
    if "TimeoutException" in kinds:
        return (
            f"the Hub at {endpoint} did not answer within {timeout:g} s ({type(err).__name__}); check HF_ENDPOINT "
            "and the network, or allow more time with --timeout."
        )
    detail = " ".join(str(err).split()) or "no details"
    return f"cannot reach the Hub at {endpoint}: {type(err).__name__}: {detail}"


@contextlib.contextmanager
def hub_network_errors(endpoint: str, timeout: float):
    """Turn a network failure inside the block into `HubConnectionError` (see `network_failure`)."""
    try:
        yield
    except Exception as err:
        message = network_failure(err, endpoint, timeout)
        if message is None:
            raise
        raise HubConnectionError(message) from err


# ---------------------------------------------------------------------------------------------------------- inputs
def _groupvq_config(config) -> GroupVQConfig:
    if isinstance(config, GroupVQConfig):
        return config
    if isinstance(config, dict) or hasattr(config, "keys"):  # a diffusers GroupVQVAE config (FrozenDict)
        return GroupVQModel.config_from_diffusers(config)
    raise ValueError(f"`config` must be a GroupVQConfig or a GroupVQVAE config, got {type(config).__name__}.")


# ---------------------------------------------------------------------------------------------------------- card
def render_model_card(
    config,
    repo_id: str,
    *,
    eval_results=None,
    resize_study=None,
    resize: dict | None = None,
    training: dict | None = None,
    diffusers: bool = False,
    num_parameters: int | None = None,
    datasets: list[str] | None = None,
    license: str = "apache-2.0",
    tags: list[str] | None = None,
    template_path: str | os.PathLike | None = None,
    discriminator: dict | None = None,
) -> ModelCard:
    """The model card (`README.md`) of a Group-VQ checkpoint, from `model_cards/groupvq.md`.

    Args:
        config: the model's `GroupVQConfig` (or a `GroupVQVAE` config).
        repo_id: where it is published (used in the loading snippets and as model name).
        eval_results: `scripts/evaluate.py` results (dict or JSON path); they go to the table and the model-index.
        resize_study: resize study table (`.md` path, JSON path, or rows).
        resize: ``{"from_size", "to_size", "mode", "seed"}`` when the codebook was resized before publishing.
        training: training settings to list (e.g. the arguments of `scripts/train.py`).
        diffusers: the repo holds the diffusers `GroupVQVAE` format (`library_name: diffusers`).
        datasets: training datasets (Hub ids, or the names of `groupvq_hf.data.SOURCES`); default: the ones
            `training["dataset"]` names (the demo photos are never listed).
    """
    validate_repo_id(repo_id)
    cfg = _groupvq_config(config)
    evals = normalize_eval_results(eval_results)
    template = Path(template_path) if template_path is not None else CARD_TEMPLATE
    if not template.is_file():
        raise FileNotFoundError(f"Model card template not found at {template}; pass `template_path`.")

    eval_dataset = dataset_id(evals["dataset"]) if evals else None
    # Training data as given, else as the training arguments name it (`--dataset imagenet:0.7+coco:0.3`); never the
    # evaluation set, and never the built-in demo photos, which are no Hub dataset.
    if datasets is None and (training or {}).get("dataset"):
        datasets = [name for name, _ in parse_dataset_spec(str(training["dataset"]))]
    datasets = [dataset_id(d) for d in (datasets or []) if d.lower() != "demo"]
    model_name = repo_id.split("/")[-1]
    eval_cards = model_index_entries(evals)
    library = "diffusers" if diffusers else "transformers"
    card_data = ModelCardData(
        library_name=library,
        license=license,
        tags=list(dict.fromkeys(BASE_TAGS + [library, *(tags or [])])),
        datasets=datasets or None,
        pipeline_tag="image-to-image",
        model_name=model_name,
        eval_results=eval_cards or None,
    )

    sizes = cfg.group_sizes or [cfg.codebook_size // cfg.num_groups] * cfg.num_groups
    ranks = cfg.group_ranks or [cfg.codebook_rank or cfg.codebook_dim] * len(sizes)
    latent = cfg.sample_size // cfg.downsample_factor

    def same_or_list(values):
        return f"{values[0]:,} each" if len(set(values)) == 1 else ", ".join(str(v) for v in values)

    def metric_text(key, value):
        if key == "codebook_usage":
            return f"{100 * value:.1f}%" if value <= 1 else f"{value:.1f}%"
        arrow = " (lower is better)" if METRICS[key][2] else ""
        return f"{value:.4g}{arrow}"

    return ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_name=model_name,
        repo_id=repo_id,
        diffusers=diffusers,
        codebook_size=int(cfg.codebook_size),
        num_groups=len(sizes),
        group_sizes_text=same_or_list(sizes),
        ranks_text=same_or_list(ranks),
        codebook_dim=cfg.codebook_dim,
        projector=cfg.projector,
        resolution=cfg.sample_size,
        downsample_factor=cfg.downsample_factor,
        latent_size=latent,
        tokens_per_image=latent * latent,
        num_parameters=f"{num_parameters:,}" if num_parameters else "see `model.num_parameters()`",
        resize=resize,
        eval_rows=[(METRICS[k][1], metric_text(k, v)) for k, v in evals["metrics"].items()] if evals else [],
        eval_dataset=DATASET_NAMES.get(eval_dataset, eval_dataset),
        eval_split=evals["split"] if evals else None,
        eval_resolution=evals["resolution"] if evals else None,
        eval_samples=evals["num_samples"] if evals else None,
        training_summary=describe_recipe(training),  # SimVQ's recipe and what this run changed
        training_rows=sorted((str(k), v if isinstance(v, str) else json.dumps(v)) for k, v in (training or {}).items()),
        example_size=2 * int(cfg.codebook_size),
        resize_study=resize_study_markdown(resize_study),
        discriminator=discriminator,
    )


# ---------------------------------------------------------------------------------------------------------- checks
def resolve_token(token: str | None = None) -> str:
    """`token`, else `HF_TOKEN`, else the saved login; a clear error when there is none."""
    token = token or get_token()
    if not token:
        raise LocalTokenNotFoundError(
            "No Hugging Face token found: set the HF_TOKEN environment variable or log in with `hf auth login` "
            "(a token with write access, see https://huggingface.co/settings/tokens)."
        )
    return token


def check_write_access(api: HfApi, repo_id: str, token: str) -> str:
    """Raise `HubAccessError` unless `token` is valid and may write to `repo_id`'s namespace; returns the user name."""
    try:
        me = api.whoami(token=token)
    except HfHubHTTPError as err:
        if err.response is not None and err.response.status_code == 401:
            raise HubAccessError(
                "The Hugging Face token (HF_TOKEN or the saved login) is invalid or expired: create a write token at "
                "https://huggingface.co/settings/tokens and set HF_TOKEN or run `hf auth login`."
            ) from err
        raise
    name = me.get("name")
    role = (me.get("auth") or {}).get("accessToken", {}).get("role")
    if role == "read":
        raise HubAccessError(
            f"The token of {name!r} is read-only: cannot publish to {repo_id!r}. Use a token with write access."
        )
    namespace = repo_id.split("/")[0] if "/" in repo_id else name
    writable = [name, *[org.get("name") for org in me.get("orgs", [])]]
    if role != "fineGrained" and namespace not in writable:
        raise HubAccessError(
            f"Repository {repo_id!r} is not writable with this token: {name!r} can write to {writable}, "
            f"not to {namespace!r}."
        )
    return name


def check_replaceable(folder: str | os.PathLike) -> None:
    """`publish` replaces `save_directory` whole: refuse a folder holding files it would not upload (a training
    output folder with checkpoints, say), which the swap would delete."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    foreign = sorted(set(files) - set(upload_file_list(folder)))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(
            f"`save_directory` {str(folder)!r} holds files that are not part of an upload ({shown}); publishing "
            "replaces the folder whole, so give an empty or new folder (or one an earlier publish wrote)."
        )


def upload_file_list(folder: str | os.PathLike) -> list[str]:
    """The files of `folder` that `publish` uploads (`ALLOW_PATTERNS` minus `IGNORE_PATTERNS`), sorted."""
    folder = Path(folder)
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return sorted(filter_repo_objects(files, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS))


def check_no_secrets(folder: str | os.PathLike, files: list[str], token: str) -> None:
    """Raise ValueError if a file about to be uploaded contains the token or is a pickle."""
    for name in files:
        content = (Path(folder) / name).read_bytes()
        if token.encode() in content:
            raise ValueError(f"Refusing to upload {name!r}: it contains the Hugging Face token.")
        # safetensors files start with their header length, anything else starting with a pickle opcode is one
        if not name.endswith(".safetensors") and content[:1] == b"\x80" and content[1:2] in PICKLE_PROTOCOLS:
            raise ValueError(f"Refusing to upload {name!r}: it is a pickle.")


# ---------------------------------------------------------------------------------------------------------- publish
def load_for_publishing(model, diffusers: bool = False):
    """A `GroupVQModel` or `GroupVQVAE` from a model object or a saved folder, in the requested format."""
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"`model` must be a folder saved with `save_pretrained` (no config.json in {path}).")
        if "_class_name" in json.loads(config_file.read_text()):  # a diffusers folder
            from ..vq_model import GroupVQVAE

            model = GroupVQVAE.from_pretrained(path)
        else:
            model = GroupVQModel.from_pretrained(path)
    is_vae = hasattr(getattr(model, "quantize", None), "resize_codebook")
    if not isinstance(model, GroupVQModel) and not is_vae:
        raise ValueError(f"`model` must be a GroupVQModel, a GroupVQVAE or a saved folder, got {type(model).__name__}.")
    if diffusers and not is_vae:
        from ..vq_model import GroupVQVAE

        model = GroupVQVAE.from_groupvq(model)
    elif not diffusers and is_vae:
        model = GroupVQModel.from_diffusers(model)
    return model.eval()


def publish(
    model,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    eval_results=None,
    resize_study=None,
    training: dict | None = None,
    codebook_size: int | None = None,
    resize_mode: str = "extend",
    resize_seed: int = 0,
    diffusers: bool = False,
    datasets: list[str] | None = None,
    commit_message: str = "Upload Group-VQ tokenizer",
    endpoint: str | None = None,
    save_directory: str | os.PathLike | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    include_discriminator: bool = False,
):
    """Save a Group-VQ tokenizer with its model card and upload it to `repo_id`; returns the `CommitInfo`.

    Args:
        model: `GroupVQModel`, `GroupVQVAE` or a folder saved by either.
        repo_id: ``"namespace/name"`` (or ``"name"`` under the token's user).
        token: defaults to `HF_TOKEN` or the saved login.
        codebook_size, resize_mode, resize_seed: resize the codebook before publishing (Algorithm 2).
        diffusers: publish the diffusers `GroupVQVAE` format instead of the transformers one.
        eval_results, resize_study, training, datasets: model card content, see [`render_model_card`].
        endpoint: Hub URL (defaults to `HF_ENDPOINT`).
        save_directory: keep the uploaded folder there (default: a temporary folder). It is written beside and
            swapped into place whole (`fileio.atomic_directory`): a reader never sees a half-written folder.
        timeout: seconds each Hub request may wait (see [`hub_timeout`]); a refused, dropped or silent connection
            raises `HubConnectionError` naming the endpoint. A failed upload changes nothing on the Hub (one
            commit): calling `publish` again completes it.
        include_discriminator: also upload the training run's `discriminator.safetensors` from the `model` folder
            (which must hold one: the export of a run with a GAN), and name it in the card, so `scripts/train.py
            --init_from` continues the GAN.
    """
    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"`repo_id` must be a non-empty string 'namespace/name', got {repo_id!r}.")
    validate_repo_id(repo_id)
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"`resize_mode` must be 'extend' or 'resample', got {resize_mode!r}.")
    if isinstance(model, (str, os.PathLike)) and not (Path(model) / "config.json").is_file():
        raise ValueError(f"`model` must be a folder saved with `save_pretrained` (no config.json in {model}).")
    discriminator = included_discriminator(model) if include_discriminator else None
    timeout = check_timeout(timeout)
    for name, value in (("eval_results", eval_results), ("resize_study", resize_study)):
        read_json(value, name)  # before any request: a missing or malformed card file is named first
    token = resolve_token(token)
    api = HfApi(endpoint=endpoint, token=token)
    with hub_timeout(timeout), hub_network_errors(api.endpoint, timeout):
        check_write_access(api, repo_id, token)
        model = load_for_publishing(model, diffusers=diffusers)
        resize = None
        if codebook_size is not None:
            quantizer = model.quantize if diffusers else model.quantizer
            resize = {"from_size": quantizer.codebook_size, "to_size": int(codebook_size), "mode": resize_mode,
                      "seed": resize_seed}
            with torch.no_grad():
                model.resize_codebook(int(codebook_size), mode=resize_mode, seed=resize_seed)
        try:
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        except HfHubHTTPError as err:
            _raise_access(err, repo_id)
        card = render_model_card(
            model.config, repo_id, eval_results=eval_results, resize_study=resize_study, resize=resize,
            training=training, diffusers=diffusers, num_parameters=sum(p.numel() for p in model.parameters()),
            datasets=datasets, discriminator=None if discriminator is None else discriminator[1],
        )
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(save_directory) if save_directory is not None else Path(tmp) / "upload"
            check_replaceable(folder)
            with atomic_directory(folder) as staging:  # weights, processor and card appear at once
                model.save_pretrained(staging)  # safetensors, config with auto_map, code files (+ image processor)
                if diffusers and not (staging / "preprocessor_config.json").exists():
                    GroupVQImageProcessor.for_resolution(model.config.sample_size).save_pretrained(staging)
                card.save(staging / "README.md")
                if discriminator is not None:
                    shutil.copyfile(discriminator[0], staging / DISCRIMINATOR_FILE)
            files = upload_file_list(folder)
            check_no_secrets(folder, files, token)
            try:  # one commit: it lands whole or not at all
                return api.upload_folder(
                    repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                    allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS,
                )
            except HfHubHTTPError as err:  # includes RepositoryNotFoundError
                _raise_access(err, repo_id)


def included_discriminator(model) -> tuple[Path, dict]:
    """The discriminator file of a saved `model` folder and its settings, for ``include_discriminator``; ValueError
    when there is none (or it is unreadable)."""
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(
            "`include_discriminator` needs `model` to be a saved folder (the discriminator file is read from it)."
        )
    path = Path(model) / DISCRIMINATOR_FILE
    if not path.is_file():
        raise ValueError(
            f"`include_discriminator`: {str(model)!r} holds no {DISCRIMINATOR_FILE} (the export of a "
            "`scripts/train.py` run with the GAN on, or a SimVQ conversion with `--keep_discriminator`, has one)."
        )
    return path, discriminator_settings(load_discriminator(path))


def _raise_access(err: HfHubHTTPError, repo_id: str):
    status = err.response.status_code if err.response is not None else None
    if status in (401, 403) or isinstance(err, RepositoryNotFoundError):
        raise HubAccessError(
            f"Cannot write to {repo_id!r} (HTTP {status}): the token (HF_TOKEN or the saved login) lacks write access "
            f"to this repository or namespace. Server said: {err}"
        ) from err
    raise err


__all__ = [
    "ALLOW_PATTERNS",
    "CARD_TEMPLATE",
    "DEFAULT_TIMEOUT",
    "HubAccessError",
    "HubConnectionError",
    "IGNORE_PATTERNS",
    "check_no_secrets",
    "check_timeout",
    "check_write_access",
    "hub_network_errors",
    "hub_timeout",
    "included_discriminator",
    "load_for_publishing",
    "model_index_entries",
    "network_failure",
    "normalize_eval_results",
    "publish",
    "render_model_card",
    "resize_study_markdown",
    "resolve_token",
    "upload_file_list",
]
