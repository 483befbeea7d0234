"""Publishing a bundle to the Hugging Face Hub as one commit that loads with one line from the repo.

The quantized base goes to the repo's root and the adapter to quailora_init/ (bundle.layout), as they lie
in the bundle. The local quailora_init/adapter_config.json names the bundle folder as its base; the
uploaded copy names the repo (and its branch), as the LoftQ repos do, so the adapter's base is found
in the same repo. The local folder is never modified: the upload reads a staging folder of links to
the bundle's files plus the rewritten adapter config and card.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .bundle.layout import CARD, INIT_ADAPTER_CONFIG, REPORT
from .bundle.read import read_json, verify_bundle
from .errors import BadInputError, QuailoraError
from .model_card import GENERATED_MARKER, render_model_card

DEFAULT_BRANCH = "main"


class HubPublishError(QuailoraError):
    """The Hub refused or could not be reached; the message says what to do."""


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    revision: str
    commit_url: str
    commit_oid: str
    files: list[str]


def hub_adapter_config(adapter_config: dict, repo_id: str, revision: str) -> dict:
    """The adapter config as uploaded: the base model is the repo itself, at the pushed branch."""
    config = dict(adapter_config)
    config["base_model_name_or_path"] = repo_id
    config["revision"] = None if revision == DEFAULT_BRANCH else revision
    return config


def push_to_hub(bundle: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, api=None) -> PushResult:
    """create_repo(exist_ok=True) [+ create_branch] + upload_folder of the bundle with a Hub-pointing adapter config."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    folder = verify_bundle(Path(bundle))
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise BadInputError(f"REPO_ID {repo_id!r} is not a valid repo id: {str(e).splitlines()[0]}") from e
    if repo_id.count("/") != 1:
        raise BadInputError(f"REPO_ID {repo_id!r}: give it as namespace/name (your user name or an organization)")
    branch = revision or DEFAULT_BRANCH
    api = api if api is not None else HfApi()
    message = commit_message or _default_commit_message(folder)
    with _hub_errors(repo_id, branch, api.endpoint):
        if _token(api) is None:
            raise HubPublishError("not logged in to the Hub: set HF_TOKEN to a write token or run `hf auth login`")
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if branch != DEFAULT_BRANCH:
            api.create_branch(repo_id, branch=branch, exist_ok=True, repo_type="model")
        adapter = hub_adapter_config(read_json(folder / INIT_ADAPTER_CONFIG, "the adapter config"), repo_id, branch)
        replaced = {INIT_ADAPTER_CONFIG: json.dumps(adapter, indent=2) + "\n"}
        card = hub_model_card(folder, repo_id, branch)
        if card is not None:
            replaced[CARD] = card
        with tempfile.TemporaryDirectory(prefix="quailora-push-") as staging:
            files = _stage(folder, Path(staging), replaced)
            info = api.upload_folder(repo_id=repo_id, folder_path=staging, repo_type="model", revision=branch,
                                     commit_message=message)
    return PushResult(repo_id, branch, info.commit_url, info.oid, files)


def hub_model_card(folder: Path, repo_id: str, branch: str) -> str | None:
    """The card as uploaded: our generated card re-rendered to load from the repo; a hand-written one as is."""
    existing = folder / CARD
    if existing.is_file() and GENERATED_MARKER not in existing.read_text(encoding="utf-8"):
        return None
    return str(render_model_card(folder, model_id=repo_id, revision=branch, write=False))


def _token(api) -> str | None:
    from huggingface_hub import get_token

    return api.token if isinstance(api.token, str) else get_token()


def _default_commit_message(folder: Path) -> str:
    report = read_json(folder / REPORT, "the conversion report")
    quantization, settings = report.get("quantization", {}), report.get("settings", {})
    return (f"Upload QuAILoRA bundle ({quantization.get('type', '?')}, r={settings.get('rank', '?')}, "
            f"solver={settings.get('solver', '?')})")


def _stage(folder: Path, staging: Path, replaced: dict[str, str]) -> list[str]:
    """Mirror the bundle into staging (symlinks, copies where links fail) with some files' text replaced."""
    files = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(folder).as_posix()
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if relative in replaced:
            target.write_text(replaced[relative])
        else:
            try:
                os.symlink(path.resolve(), target)
            except OSError:
                shutil.copy2(path, target)
        files.append(relative)
    for relative in sorted(set(replaced) - set(files)):
        (staging / relative).write_text(replaced[relative])
        files.append(relative)
    return sorted(files)


class _hub_errors:
    """huggingface_hub / HTTP errors -> one actionable HubPublishError line (most specific first)."""

    def __init__(self, repo_id: str, branch: str, endpoint: str):
        self.repo_id, self.branch, self.endpoint = repo_id, branch, endpoint

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None or isinstance(error, QuailoraError):
            return False
        message = hub_error_message(error, self.repo_id, self.branch, self.endpoint)
        if message is None:
            return False
        raise HubPublishError(message) from error


def hub_error_message(error: BaseException, repo_id: str, branch: str, endpoint: str) -> str | None:
    import httpx2
    from huggingface_hub import errors as hub

    namespace = repo_id.split("/")[0]
    if isinstance(error, hub.OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set: unset it to push to the Hub"
    if isinstance(error, httpx2.TransportError):
        return f"cannot reach the Hub at {endpoint} ({type(error).__name__}): check the network, proxy or HF_ENDPOINT"
    if isinstance(error, ValueError) and str(error).startswith("Invalid metadata in README.md"):
        details = " ".join(line.strip("- ") for line in str(error).splitlines()[1:] if line.strip())
        return f"the Hub rejected the model card's metadata (README.md): {details or 'no details given'}"
    if not isinstance(error, hub.HfHubHTTPError) or error.response is None:
        return None
    status = error.response.status_code
    server = (error.server_message or "").strip().splitlines()
    detail = f" (Hub says: {server[0]})" if server else ""
    if status == 401:
        return (f"the Hub did not accept your credentials for {repo_id}{detail}: set HF_TOKEN to a valid write token "
                "or run `hf auth login`")
    if status == 403:
        return (f"permission denied: your token cannot write to {repo_id}{detail}; use a token with write access to "
                f"the '{namespace}' namespace (a fine-grained token needs 'write' on it)")
    if isinstance(error, hub.RevisionNotFoundError):
        return f"branch {branch!r} was not found in {repo_id} and could not be created{detail}"
    if isinstance(error, hub.RepositoryNotFoundError):
        return f"{repo_id} not found after create_repo{detail}: check the namespace and that your token can write to it"
    if status == 429:
        return f"rate-limited by the Hub{detail}; retry later"
    if status == 409:
        return f"conflict on {repo_id}@{branch}{detail}: someone pushed meanwhile; retry"
    if status == 413:
        return f"the Hub refused a file as too large{detail}"
    return f"the Hub refused the request (HTTP {status}){detail}"
