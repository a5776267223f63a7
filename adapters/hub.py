"""Push an adapter or merged-model folder to the Hugging Face Hub, with a validated model card.

The token comes from HF_TOKEN or the huggingface_hub login (`hf auth login`) and is only ever handed
to huggingface_hub: it is never printed, logged or written, error messages are scrubbed of it, and a
push refuses a folder in which any file contains it. `dry_run` lists what would be uploaded and
validates the card without a token or a network. Every failure is one MoetuneError line (exit 2).

The upload is one commit (`create_repo(exist_ok=True)`, `create_branch` for a revision, then
`create_commit`). The uploaded copy of the card is completed first (`adapters.card_completion`: a
card written when there is none, base model, license, tags) and its loading snippet names the repo
instead of "path/to/this/folder"; the uploaded adapter_config.json names the base's Hub id when one
is known. Nothing in the local folder is changed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from adapters.card_completion import CompletedCard, complete_card
from adapters.errors import MoetuneError
from adapters.model_card import THIS_FOLDER, hub_token, is_hub_id, scrub

# Pickle-based weight files: never loaded (merge, combine) and never pushed.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_OFFLINE = "HF_HUB_OFFLINE is set, so nothing can be pushed; unset it (and TRANSFORMERS_OFFLINE)"
_SCAN_LIMIT = 64 << 20  # files up to this size are scanned whole for the token; larger ones: head and tail


def _files(folder: Path) -> list[tuple[str, Path, int]]:
    """(path in repo, path, size) of every file to upload: all but hidden files and caches."""
    found = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts) or not path.is_file():
            continue
        if path.suffix in PICKLE_SUFFIXES:
            raise MoetuneError(
                f"{path} is a pickle file; moetune pushes safetensors only (remove it or convert it to safetensors)"
            )
        found.append((rel.as_posix(), path, path.stat().st_size))
    if not found:
        raise MoetuneError(f"{folder} has no files to push")
    return found


def _contains(path: Path, needle: bytes, size: int) -> bool:
    with open(path, "rb") as f:
        if size <= _SCAN_LIMIT:
            return needle in f.read()
        head = f.read(_SCAN_LIMIT // 2)  # e.g. a safetensors header (its metadata)
        f.seek(size - _SCAN_LIMIT // 2)
        return needle in head or needle in f.read()


def _refuse_token_in_files(files: list[tuple[str, Path, int]], token: str | None) -> None:
    if not token:
        return
    for rel, path, size in files:
        if _contains(path, token.encode(), size):
            raise MoetuneError(
                f"{rel} contains your Hugging Face token; remove it from the file before pushing"
            )


def _human(size: float) -> str:
    units = ("B", "KB", "MB", "GB")
    step = 0
    while size >= 1000 and step < len(units) - 1:
        size, step = size / 1000, step + 1
    return f"{size:.0f} B" if step == 0 else f"{size:.1f} {units[step]}"


def _is_network_error(err: BaseException) -> bool:
    names = {cls.__name__ for cls in type(err).__mro__}
    network = {
        "ConnectError",
        "ConnectTimeout",
        "TimeoutException",
        "NetworkError",
        "TransportError",
        "ConnectionError",
    }
    return isinstance(err, OSError) or bool(names & network)


@dataclass
class PushResult:
    """What `push_folder` uploaded (or, with `dry_run`, would upload); `str()` is what `moetune push` prints."""

    repo_id: str
    revision: str | None
    private: bool
    files: list[tuple[str, int]]  # (path in the repo, bytes)
    dry_run: bool
    card_filled: list[str]  # what completing the uploaded card filled in
    rewritten_base: str | None  # the base the uploaded adapter_config.json names, when rewritten
    warnings: list[str]  # about the card
    token_missing: bool
    commit_url: str | None = None

    @property
    def where(self) -> str:
        branch = f" (branch {self.revision})" if self.revision else ""
        return f"{self.repo_id}{branch}" + (" [private]" if self.private else "")

    def __str__(self) -> str:
        count, total = len(self.files), _human(sum(size for _, size in self.files))
        if self.dry_run:
            lines = [f"dry run: would upload {count} files ({total}) to {self.where}"]
            lines += [f"  {_human(size):>10}  {rel}" for rel, size in self.files]
        else:
            lines = [f"pushed {count} files ({total}) to {self.where}: {self.commit_url}"]
        card = "model card: valid"
        if self.card_filled:
            card += f" after completing the uploaded copy (README.md here is unchanged): {'; '.join(self.card_filled)}"
        lines.append(card)
        if self.rewritten_base:
            lines.append(f"adapter_config.json: the uploaded copy names the base {self.rewritten_base}")
        lines += [f"warning: {w}" for w in self.warnings]
        if self.dry_run and self.token_missing:
            lines.append("note: no Hugging Face token is set; a real push needs HF_TOKEN or `hf auth login`")
        return "\n".join(lines)


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    base_model: str | None = None,
    license: str | None = None,
) -> PushResult:
    """Upload `folder` to the Hub model repo `repo_id` (created if needed); return what was done.

    The uploaded card is completed first (`adapters.card_completion`: `base_model` is the Hub id of
    the base, `license` the card's license); the folder itself is never changed.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    folder = Path(folder)
    if not folder.is_dir():
        raise MoetuneError(f"{folder} is not a folder; give an adapter or merged-model folder")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise MoetuneError(
            f"--repo-id '{repo_id}' is not a valid Hub repo id (write org/name): {err}"
        ) from err
    if "/" not in repo_id:
        raise MoetuneError(
            f"--repo-id '{repo_id}' needs a namespace: write your-user/{repo_id} or org/{repo_id}"
        )
    files = _files(folder)
    card = complete_card(folder, base_model=base_model, license=license)
    contents = _rewritten(folder, card, repo_id)
    if "README.md" not in {rel for rel, _, _ in files}:
        files.append(("README.md", folder / "README.md", len(contents["README.md"])))
    token = hub_token()
    _refuse_token_in_files([f for f in files if f[1].is_file()], token)

    result = PushResult(
        repo_id=repo_id,
        revision=revision,
        private=private,
        files=[(rel, size) for rel, _, size in files],
        dry_run=dry_run,
        card_filled=list(card.filled),
        rewritten_base=card.base_model if "adapter_config.json" in contents else None,
        warnings=list(card.warnings),
        token_missing=not token,
    )
    if dry_run:
        return result
    if not token:
        raise MoetuneError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again (--dry-run needs none)"
        )
    try:
        result.commit_url = _upload(
            folder, repo_id, files, contents, token, private=private, revision=revision
        )
    except MoetuneError:
        raise
    except Exception as err:
        raise MoetuneError(scrub(_explain(err, repo_id), token)) from None
    return result


def _rewritten(folder: Path, card: CompletedCard, repo_id: str) -> dict[str, bytes]:
    """Files whose uploaded copy differs from the local one: the card, and the adapter's recorded base.

    The card's loading snippet names the repo instead of "path/to/this/folder"; adapter_config.json
    names the base's Hub id (when known) instead of a local path, so `AutoPeftModel` finds the base.
    """
    contents = {"README.md": card.text.replace(THIS_FOLDER, repo_id).encode()}
    config_path = folder / "adapter_config.json"
    if card.base_model and config_path.is_file():
        config = json.loads(config_path.read_text())
        if config.get("base_model_name_or_path") != card.base_model and not is_hub_id(
            config.get("base_model_name_or_path")
        ):
            config["base_model_name_or_path"] = card.base_model
            contents["adapter_config.json"] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    return contents


def _upload(folder, repo_id, files, contents, token, *, private, revision) -> str:
    """One commit with every file; returns its URL."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise MoetuneError(_OFFLINE)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    operations = [
        CommitOperationAdd(path_in_repo=rel, path_or_fileobj=contents.get(rel, str(path)))
        for rel, path, _ in files
    ]
    kind = "adapter" if (folder / "adapter_config.json").is_file() else "model"
    info = api.create_commit(
        repo_id,
        operations=operations,
        commit_message=f"Upload {kind} with moetune",
        revision=revision,
        repo_type="model",
    )
    return info.commit_url


def _explain(err: Exception, repo_id: str) -> str:
    """One line for a failed push."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(err, OfflineModeIsEnabled):
        return _OFFLINE
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        if status == 401:
            return (
                "the Hub rejected the token (401 Unauthorized); check HF_TOKEN or run `hf auth login` again"
            )
        if status == 403:
            return f"the token may not write to {repo_id} (403 Forbidden); use a write token or another --repo-id"
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"the Hub answered {status} while pushing to {repo_id}: {first}"
    if _is_network_error(err):
        return (
            f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]}); check the network or HF_ENDPOINT"
        )
    if isinstance(err, ValueError) and "metadata" in str(err):
        return f"the Hub rejected README.md: {' '.join(str(err).split())}"
    return f"push to {repo_id} failed: {type(err).__name__}: {' '.join(str(err).split())[:300]}"
