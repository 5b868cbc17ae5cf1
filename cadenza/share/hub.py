"""Share trained models on the Hugging Face Hub (`cadenza upload hf_hub`, `Model.upload_to_hf_hub`) and fetch
them back (`Model.from_pretrained`).

Repo layout, chosen so the repo is usable without Cadenza and converts back to a model folder exactly:

    llm   the contents of model/model_weights/ at the repo root (a plain transformers or PEFT folder, so
          `AutoModelForCausalLM.from_pretrained(repo)` / `PeftModel.from_pretrained(base, repo)` work), next to
          cadenza_model.json, model_hyperparameters.json and training_set_metadata.json
    ecd   the model folder as it is: model_weights.safetensors, encoders/<feature>/ (PEFT adapters), the json files
    both  README.md, the model card (cadenza.share.model_card)

Everything that can be checked locally is checked before the first request: the repo id, the model folder
(cadenza.artifacts.check_model_folder: complete, readable, safetensors only), a token, and that huggingface_hub is
not in offline mode. The token is handed to huggingface_hub and nowhere else: it is never printed, logged, put in
the card or uploaded (a file that contains it is refused), and server messages are relayed scrubbed of it. The
local folder is only ever read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, Optional, Union

from . import model_card
from ..artifacts import (CONFIG_FILE, ECD_WEIGHTS, ENCODERS_DIR, LLM_WEIGHTS, MODEL_DIR, MODEL_INFO, METADATA_FILE,
                        PICKLE_SUFFIXES, RETRIEVAL_FILE, atomic_dir, check_model_folder, read_model_json)
from ..data.cache import cache_root
from ..errors import CadenzaError, ModelFolderError

CARD = "README.md"
CADENZA_FILES = (MODEL_INFO, CONFIG_FILE, METADATA_FILE)
# the files an llm model folder keeps beside model_weights/ (few-shot examples among them); on the Hub they share
# the root with the weights folder's files, so download sorts them back by name
LLM_ROOT_FILES = (*CADENZA_FILES, RETRIEVAL_FILE)
RUN_FILES = ("training_statistics.json", "test_statistics.json", "description.json")
# files a user may have added to the repo by hand (docs, images); everything else that the new upload does
# not contain is stale model content and is deleted in the same commit
KEPT_REMOTE_SUFFIXES = (".md", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp")
REPO_TYPES = ("model", "dataset")
SECRET_KEY = re.compile(r"(credentials?|password|secret|api_key|access_key|auth_token|hf_token|^token)$", re.I)
# `Bearer <credential>` (an echoed Authorization header) and anything shaped like a Hugging Face token
BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s\"',;)]+")
HF_TOKEN_SHAPE = re.compile(r"\bhf_[A-Za-z0-9]{16,}")
DOWNLOAD_FORMAT = "v1"


class HubError(CadenzaError):
    """The Hub refused a request or could not be reached (the message names repo, endpoint and HTTP status),
    or an upload/download was not possible as asked (no token, offline mode, a bad repo id)."""


def _say(message: str) -> None:
    print(message, flush=True)


# ============================================================================================ local checks
def check_repo_id(repo_id: str) -> None:
    """`namespace/name` with the Hub's rules (letters, digits, - _ . ; no -- or ..; at most 96 characters)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubError(f"repo id {repo_id!r} must be `namespace/name` (your user or organisation, a slash, the "
                       "model name), e.g. `my-org/my-model`")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"repo id {repo_id!r} is not valid on the Hub: {e}") from None


def check_repo_type(repo_type: str) -> None:
    if repo_type not in REPO_TYPES:
        raise HubError(f"repo_type {repo_type!r}: a Cadenza model goes into a {' or '.join(REPO_TYPES)} repo")


def resolve_token(token: Optional[str]) -> str:
    """The token argument, else HF_TOKEN, else the login stored by `hf auth login` (huggingface_hub decides)."""
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise HubError("no Hugging Face token: uploading needs a token with write access. Run `hf auth login`, "
                       "or set the HF_TOKEN environment variable (https://huggingface.co/settings/tokens)")
    return found


def check_online() -> None:
    from huggingface_hub import is_offline_mode

    if is_offline_mode():
        raise HubError("HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so huggingface_hub makes no requests; "
                       "unset it to upload")


def endpoint() -> Optional[str]:
    """HF_ENDPOINT read now rather than when huggingface_hub was imported, so setting it later still counts."""
    value = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    return value or None


def _shown_endpoint() -> str:
    from huggingface_hub import constants

    return endpoint() or constants.ENDPOINT


# ======================================================================================== the model folder
@dataclass
class ModelFolder:
    """A checked model folder and the files that go into the repo (repo path -> local file)."""

    model_dir: Path
    run_dir: Optional[Path]
    info: dict
    config: dict
    metadata: dict
    model_type: str
    llm_kind: Optional[str]  # "adapter" | "full"
    files: dict[str, Path] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def inspect_model_folder(model_path: Union[str, Path]) -> ModelFolder:
    """Check the folder with the validator every reader uses (cadenza.artifacts.check_model_folder), then what only
    publishing needs: trained weights, no credentials in the config; and list what to upload."""
    saved = check_model_folder(model_path)
    model_dir = saved.model_dir
    if saved.llm_weights == "base":
        raise ModelFolderError(f"{model_dir} holds no trained weights (the llm was not fine-tuned, e.g. "
                               "trainer: none): there is nothing to publish beyond the base model and the config")
    folder = ModelFolder(model_dir=model_dir, run_dir=_run_dir(model_dir), info=saved.info, config=saved.config,
                         metadata=saved.metadata, model_type=saved.model_type, llm_kind=saved.llm_weights)
    if saved.model_type == "ecd":
        folder.warnings += _missing_encoder_adapters(model_dir, saved.config)
    _refuse_credentials(saved.config, model_dir / CONFIG_FILE)
    folder.files, folder.skipped = _repo_files(model_dir, saved.model_type)
    return folder


def _refuse_credentials(config, path: Path, key_path: str = "") -> None:
    """The config is published (as a file and in the card): credentials in it must not be."""
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else []
    for key, value in items:
        where = f"{key_path}.{key}" if key_path else str(key)
        if isinstance(key, str) and SECRET_KEY.search(key) and value not in (None, "", {}, []):
            raise ModelFolderError(f"{path}: {where} holds credentials, and the config is published with the model; "
                                   "remove them (e.g. use environment variables) before uploading")
        _refuse_credentials(value, path, where)


def _run_dir(model_dir: Path) -> Optional[Path]:
    parent = model_dir.parent
    if model_dir.name == MODEL_DIR and any((parent / name).is_file() for name in RUN_FILES):
        return parent
    return None


def _missing_encoder_adapters(model_dir: Path, config: dict) -> list[str]:
    """An adapted encoder is also saved as a plain PEFT folder; its weights live in model_weights.safetensors
    too, so a missing folder only costs use outside Cadenza (a warning, not an error)."""
    notes = []
    for feature in config.get("input_features", []):
        folder = model_dir / ENCODERS_DIR / feature["name"]
        if (feature.get("encoder") or {}).get("adapter") and not (folder / "adapter_config.json").is_file():
            notes.append(f"{ENCODERS_DIR}/{feature['name']}/ is missing: the adapter is uploaded inside {ECD_WEIGHTS} "
                         "only")
    return notes


def _repo_files(model_dir: Path, model_type: str) -> tuple[dict[str, Path], list[str]]:
    """Map repo paths to local files; list what is left out (temporary, hidden, checkpoints, pickles)."""
    files: dict[str, Path] = {}
    skipped: list[str] = []
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        rel = PurePosixPath(path.relative_to(model_dir).as_posix())
        if _left_out(rel):
            skipped.append(str(rel))
            continue
        if model_type == "llm":
            if rel.parts[0] == LLM_WEIGHTS:
                rel = PurePosixPath(*rel.parts[1:])
                if str(rel) == CARD:  # PEFT's boilerplate card; ours replaces it
                    skipped.append(f"{LLM_WEIGHTS}/{CARD}")
                    continue
            elif str(rel) not in LLM_ROOT_FILES:
                skipped.append(str(rel))
                continue
        key = str(rel)
        if key in files or key == CARD:
            raise ModelFolderError(f"{model_dir}: two files would be uploaded as {key!r} ({files.get(key, CARD)} and "
                                   f"{path}); rename one")
        files[key] = path
    return files, skipped


def _left_out(rel: PurePosixPath) -> bool:
    return (any(part.startswith(".") or part.startswith("checkpoint") for part in rel.parts)
            or rel.suffix in PICKLE_SUFFIXES or rel.name.endswith(".tmp"))


# ================================================================================================= plan
@dataclass
class UploadPlan:
    repo_id: str
    folder: ModelFolder
    card: str
    rewritten: dict[str, bytes] = field(default_factory=dict)  # files published with changed content

    def operations_content(self) -> dict[str, Union[Path, bytes]]:
        return {**self.folder.files, **self.rewritten, CARD: self.card.encode()}


def plan_upload(repo_id: str, model_path: Union[str, Path]) -> UploadPlan:
    """Everything about an upload that needs no network: checks, the file list and the model card."""
    check_repo_id(repo_id)
    folder = inspect_model_folder(model_path)
    return UploadPlan(repo_id=repo_id, folder=folder, card=model_card.render_card(_card_inputs(repo_id, folder)),
                      rewritten=_published_adapter_config(folder))


def _published_adapter_config(folder: ModelFolder) -> dict[str, bytes]:
    """PEFT records the base model as the path it was loaded from; for a packaged base (e.g. `smollm2`, loaded
    from a converted copy in the cache) that is a local path, useless elsewhere. The published copy names the
    Hub model instead, so `AutoPeftModelForCausalLM.from_pretrained(repo)` works. Cadenza itself loads the base
    from the config, so the change does not affect `Model.from_pretrained`."""
    if folder.llm_kind != "adapter":
        return {}
    hub_id, _, _ = model_card.base_model_reference(folder.config.get("base_model"))
    path = folder.files.get("adapter_config.json")
    adapter = read_model_json(path) if path else {}
    recorded = adapter.get("base_model_name_or_path")
    if not hub_id or not recorded or recorded == hub_id or not Path(recorded).is_absolute():
        return {}
    return {"adapter_config.json": (json.dumps({**adapter, "base_model_name_or_path": hub_id}, indent=2) + "\n").encode()}


def _card_inputs(repo_id: str, folder: ModelFolder) -> model_card.CardInputs:
    run = folder.run_dir
    stats = {name: model_card.load_optional_json(run / name) if run else None for name in RUN_FILES}
    adapter_config = None
    if folder.llm_kind == "adapter":
        adapter_config = model_card.load_optional_json(folder.model_dir / LLM_WEIGHTS / "adapter_config.json")
    encoders = sorted({PurePosixPath(p).parts[1] for p in folder.files if p.startswith("encoders/")})
    return model_card.CardInputs(
        repo_id=repo_id, model_type=folder.model_type, llm_kind=folder.llm_kind, config=folder.config,
        metadata=folder.metadata, files=sorted([*folder.files, CARD]),
        training_statistics=stats["training_statistics.json"], test_statistics=stats["test_statistics.json"],
        description=stats["description.json"], adapter_config=adapter_config, encoder_adapters=encoders)


def _refuse_secret(plan: UploadPlan, token: str) -> None:
    """Defence in depth: a token pasted into a config or prompt must not be published."""
    needle = token.encode()
    for path_in_repo, content in plan.operations_content().items():
        found = needle in content if isinstance(content, bytes) else _file_contains(Path(content), needle)
        if found:
            raise HubError(f"refusing to upload: {path_in_repo} contains your Hugging Face token; remove it from "
                           "the model folder (and revoke the token if it was shared)")


def _file_contains(path: Path, needle: bytes, chunk: int = 1 << 23) -> bool:
    """Chunked, so multi-GB weight shards are scanned without loading them whole."""
    tail = b""
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            if needle in tail + block:
                return True
            tail = (tail + block)[-(len(needle) - 1):] if len(needle) > 1 else b""
    return False


# ============================================================================================== network
@contextlib.contextmanager
def _hub_call(action: str, repo_id: str, token: Optional[str]) -> Iterator[None]:
    """Turn huggingface_hub/httpx failures into one plain line: what, which repo, which endpoint, what status.
    What the server said is relayed scrubbed of credentials (a server or proxy may echo the Authorization header
    into its error), and the original exception is not chained on: its text would carry them unscrubbed."""
    try:
        yield
    except Exception as e:
        message = _failure_message(e, action, repo_id)
        if message is None:
            raise
        raise HubError(scrub_secrets(message, token)) from None


def _failure_message(e: Exception, action: str, repo_id: str) -> Optional[str]:
    """One line for a failed Hub call, or None for an exception that is not about the Hub."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    if isinstance(e, LocalEntryNotFoundError):
        return (f"{action} {repo_id}: it is not in the local cache and the Hub could not be used "
                f"({str(e).splitlines()[0]})")
    if isinstance(e, HfHubHTTPError):
        response = getattr(e, "response", None)
        status = getattr(response, "status_code", None)
        url = str(response.request.url) if response is not None and response.request is not None else _shown_endpoint()
        detail = (e.server_message or "").strip().splitlines()[0] if e.server_message else ""
        return (f"{action} failed for {repo_id}: HTTP {status} from {url}" + (f" ({detail})" if detail else "")
                + _hint(status))
    if isinstance(e, OfflineModeIsEnabled):
        return f"{action} for {repo_id}: huggingface_hub is in offline mode (HF_HUB_OFFLINE)"
    if isinstance(e, (httpx2.HTTPError, ConnectionError)):
        return f"{action} failed for {repo_id}: could not reach {_shown_endpoint()} ({type(e).__name__}: {e})"
    return None


def scrub_secrets(text: str, token: Optional[str]) -> str:
    """`text` with the token in use (passed, or the stored login huggingface_hub falls back on) and any bearer
    credential or hf_... token replaced by ***, so a relayed server message cannot print one."""
    for secret in {token, _stored_token()} - {None, ""}:
        text = text.replace(secret, "***")
    return HF_TOKEN_SHAPE.sub("hf_***", BEARER.sub(r"\1***", text))


def _stored_token() -> Optional[str]:
    from huggingface_hub import get_token

    return get_token()


def _hint(status: Optional[int]) -> str:
    hints = {
        401: ". The token was rejected or the repo is private: check it with `hf auth whoami`, log in again "
             "with `hf auth login` or set HF_TOKEN",
        403: ". The token may not write there: use a token with write access, and a namespace that is your user "
             "or an organisation you belong to",
        404: ". The repo or revision does not exist (or is private and the token cannot see it)",
    }
    if status is not None and status >= 500:
        return ". The Hub had a problem; try again later. Nothing was changed locally"
    return hints.get(status, "")


def upload_to_hf_hub(repo_id: str, model_path: Union[str, Path], *, private: bool = False,
                     commit_message: Optional[str] = None, commit_description: Optional[str] = None,
                     repo_type: str = "model", revision: Optional[str] = None, create_pr: bool = False,
                     token: Optional[str] = None, log: Callable[[str], None] = _say) -> str:
    """Publish a run folder or model folder as `repo_id` (created if missing) with a model card; returns the
    commit URL (the pull request URL with create_pr). Uploading the same folder again changes nothing."""
    check_repo_type(repo_type)
    plan = plan_upload(repo_id, model_path)
    token = resolve_token(token)
    _refuse_secret(plan, token)
    check_online()
    for note in plan.folder.warnings:
        log(f"note: {note}")
    if plan.folder.skipped:
        log("not uploaded: " + ", ".join(plan.folder.skipped))

    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint(), token=token)
    target = revision or "main"
    log(f"uploading {plan.folder.model_dir} ({_kind(plan.folder)}, {len(plan.folder.files) + 1} files) to "
        f"{repo_id}@{target} on {_shown_endpoint()}")
    with _hub_call("creating the repo", repo_id, token):
        api.create_repo(repo_id, private=private, repo_type=repo_type, exist_ok=True)
    if revision and revision != "main" and not create_pr:
        with _hub_call(f"creating branch {revision!r}", repo_id, token):
            api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
    operations = _operations(api, plan, repo_type, target)
    message = commit_message or f"Upload {_kind(plan.folder)} trained with Cadenza"
    with _hub_call("committing the files", repo_id, token):
        info = api.create_commit(repo_id, operations=operations, commit_message=message,
                                 commit_description=commit_description, repo_type=repo_type, revision=target,
                                 create_pr=create_pr)
    url = info.pr_url or info.commit_url
    log(f"uploaded: {url}")
    return url


def _kind(folder: ModelFolder) -> str:
    return {"adapter": "LLM adapter", "full": "LLM"}.get(folder.llm_kind, "ecd model")


def _operations(api, plan: UploadPlan, repo_type: str, revision: str) -> list:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    content = plan.operations_content()
    adds = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=data if isinstance(data, bytes) else str(data))
            for path, data in sorted(content.items())]
    stale = [p for p in _remote_files(api, plan.repo_id, repo_type, revision)
             if p not in content and p != ".gitattributes" and not p.lower().endswith(KEPT_REMOTE_SUFFIXES)]
    return adds + [CommitOperationDelete(path_in_repo=p) for p in stale]


def _remote_files(api, repo_id: str, repo_type: str, revision: str) -> list[str]:
    """Files at the target revision; a revision that does not exist yet has none."""
    from huggingface_hub.errors import RevisionNotFoundError

    with _hub_call("listing the repo", repo_id, api.token):
        try:
            return api.list_repo_files(repo_id, repo_type=repo_type, revision=revision)
        except RevisionNotFoundError:
            return []


# ============================================================================================== download
def download_model(repo_id: str, *, revision: Optional[str] = None, token: Optional[str] = None,
                   cache_dir: Optional[Union[str, Path]] = None, trust_remote_code: bool = False,
                   repo_type: str = "model", log: Callable[[str], None] = _say) -> Path:
    """Download a Cadenza repo and rebuild the model folder that `Model.load` takes; returns its path.

    The Hub snapshot goes into huggingface_hub's cache (or `cache_dir`); the model folder is built next to it
    once per commit, from hard links when the file system allows (no second copy of the weights).
    trust_remote_code: accept a config that asks to run model code from the Hub (only for repos you trust)."""
    check_repo_id(repo_id)
    check_repo_type(repo_type)
    snapshot = _snapshot(repo_id, revision, token, cache_dir, repo_type)
    commit = snapshot.name
    root = Path(cache_dir) / "cadenza-models" if cache_dir else cache_root() / "hub-models"
    final = root / f"{repo_type}s--{repo_id.replace('/', '--')}" / commit / MODEL_DIR
    if not (final / MODEL_INFO).is_file():
        with atomic_dir(final) as tmp:
            _rebuild(snapshot, tmp, repo_id)
            check_model_folder(tmp)  # a repo that is not a complete, safe model never becomes a cached folder
        log(f"{repo_id}@{revision or 'main'} ({commit[:10]}) is in {final}")
    if not trust_remote_code:
        _refuse_remote_code(read_model_json(final / CONFIG_FILE), repo_id)
    return final


def _refuse_remote_code(config, repo_id: str, key_path: str = "") -> None:
    """A downloaded config is untrusted input: `trust_remote_code: true` in it would run code on load."""
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else []
    for key, value in items:
        where = f"{key_path}.{key}" if key_path else str(key)
        if key == "trust_remote_code" and value is True:
            raise HubError(f"{repo_id}: its config sets {where}: true, so loading it would run Python code from "
                           "the Hub; pass trust_remote_code=True only if you trust that code")
        _refuse_remote_code(value, repo_id, where)


def _snapshot(repo_id: str, revision: Optional[str], token: Optional[str], cache_dir, repo_type: str) -> Path:
    from huggingface_hub import snapshot_download

    with _hub_call("downloading", repo_id, token):
        path = snapshot_download(repo_id, revision=revision, token=token, endpoint=endpoint(), repo_type=repo_type,
                                 cache_dir=str(cache_dir) if cache_dir else None)
    return Path(path)


def _rebuild(snapshot: Path, target: Path, repo_id: str) -> None:
    """Undo the upload layout: for an llm every repo file but the Cadenza ones goes back into model_weights/."""
    info_path = snapshot / MODEL_INFO
    if not info_path.is_file():
        raise HubError(f"{repo_id} is not a Cadenza model (no {MODEL_INFO} at its root). A plain transformers "
                       f"model can be fine-tuned with `base_model: {repo_id}` in an llm config")
    model_type = read_model_json(info_path).get("model_type")
    for path in sorted(p for p in snapshot.rglob("*") if p.is_file()):
        rel = path.relative_to(snapshot)
        if rel.as_posix() in (CARD, ".gitattributes"):
            continue
        if model_type == "llm" and rel.as_posix() not in LLM_ROOT_FILES:
            rel = Path(LLM_WEIGHTS) / rel
        _link_or_copy(path, target / rel)


def _link_or_copy(source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    real = source.resolve()
    try:
        os.link(real, dest)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(real, dest)


# =================================================================================================== CLI
def register_cli(subparsers) -> argparse.ArgumentParser:
    """`cadenza upload hf_hub -r org/name -m <run or model folder> [...]` (Ludwig's flags)."""
    p = subparsers.add_parser(
        "upload", help="publish a trained model on the Hugging Face Hub",
        description="Publish a trained model (run folder or its model/ folder) on the Hugging Face Hub with a "
                    "model card. The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT selects another Hub.")
    p.add_argument("service", choices=["hf_hub"], help="where to publish (the Hugging Face Hub)")
    p.add_argument("-r", "--repo_id", required=True, help="namespace/name, e.g. my-org/my-model")
    p.add_argument("-m", "--model_path", required=True, help="the run folder or the model folder inside it")
    p.add_argument("-p", "--private", action="store_true", help="create the repo private (if it does not exist)")
    p.add_argument("-t", "--repo_type", default="model", choices=REPO_TYPES, help="repo type (default: model)")
    p.add_argument("-c", "--commit_message", default=None, help="commit message")
    p.add_argument("-d", "--commit_description", default=None, help="commit description")
    p.add_argument("--revision", default=None, help="branch to commit to (created from main if missing)")
    p.add_argument("--create_pr", action="store_true", help="open a pull request instead of committing")
    p.set_defaults(func=cmd_upload)
    return p


def cmd_upload(args: argparse.Namespace) -> int:
    upload_to_hf_hub(args.repo_id, args.model_path, private=args.private, commit_message=args.commit_message,
                     commit_description=args.commit_description, repo_type=args.repo_type,
                     revision=args.revision, create_pr=args.create_pr)
    return 0
