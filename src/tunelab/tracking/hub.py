"""`tunelab export push_to_hub=<user or org>/<name>`: the exported directory uploaded to the Hugging Face Hub with
huggingface_hub (create the repository if needed, then one commit of the folder).

The command line checks the repository id and that the hub can be reached before the model loads (one line, exit
2, no retries offline); the upload itself is huggingface_hub's, authenticated as `hf auth login` or HF_TOKEN set up.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from tunelab.errors import ConfigError

HINT_OFFLINE = ("export without push_to_hub (the model is written to out=) and upload that directory later from a "
                "machine with a network: hf upload <repo> <dir>")


def check_push(cfg: DictConfig) -> None:
    """push_to_hub, when set, names a valid repository and the hub is reachable from here (not HF_HUB_OFFLINE)."""
    repo_id = cfg.get("push_to_hub")
    if repo_id is None:
        return
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(str(repo_id))
    except HFValidationError as err:
        raise ConfigError(f"push_to_hub={repo_id!r} is not a hub repository id: {str(err).splitlines()[0]}",
                          "key push_to_hub", "push_to_hub=<user or org>/<name>, e.g. push_to_hub=me/tiny-reviews") \
            from None
    from tunelab.config.machine import reachable

    if constants.is_offline_mode():
        why = "HF_HUB_OFFLINE is set"
    elif not reachable(constants.ENDPOINT):
        why = "the hub cannot be reached from this machine"
    else:
        return
    raise ConfigError(f"push_to_hub={repo_id} needs the Hugging Face Hub, and {why}", "key push_to_hub", HINT_OFFLINE)


def push(folder: Path, repo_id: str, private: bool, message: str) -> str:
    """Create `repo_id` (a model repository; kept if it exists) and upload `folder` as one commit; its URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder), commit_message=message)
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        hint = ("log in with `hf auth login` (or set HF_TOKEN) with a token that may write to this repository"
                if status in (401, 403) else f"the model is exported in {folder}; upload it again later")
        raise ConfigError(f"the hub refused the upload to {repo_id}: {str(err).splitlines()[0]}", "key push_to_hub",
                          hint) from None
    return str(getattr(commit, "commit_url", None) or getattr(commit, "repo_url", None) or repo_id)
