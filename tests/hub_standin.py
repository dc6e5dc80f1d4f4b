"""A local stand-in for the Hub repo methods of ``huggingface_hub.HfApi`` that :mod:`mmdemo.sync` uses.

Repos are folders under ``root`` (so that several processes share them, as they share the Hub): a
``state.json`` with every commit (its message, operations and resulting tree: path -> content hash) and an
``objects/`` folder of file contents by hash; ``journal.jsonl`` records every commit's operations and every
squash, for the tests. As on the Hub, a commit is all or nothing (the state is
replaced atomically, after the contents are written), a repo id is looked up with its type, deleting a
file the repo does not hold fails, and ``super_squash_history`` leaves one commit: contents that only old
commits referenced are gone (the Hub's garbage collection, done at once here).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable

import httpx2
from huggingface_hub import CommitOperationAdd, CommitOperationDelete
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError


class LocalHub:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # -- the HfApi methods --

    def create_repo(self, repo_id: str, *, private: bool | None = None, repo_type: str | None = None,
                    exist_ok: bool = False, **_: Any) -> SimpleNamespace:
        folder = self._folder(repo_id)
        if (folder / "state.json").is_file():
            if not exist_ok:
                raise FileExistsError(f"{repo_id} exists")
            return SimpleNamespace(repo_id=repo_id)
        (folder / "objects").mkdir(parents=True, exist_ok=True)
        gitattributes = self._store_blob(folder, b"*.db filter=lfs\n")
        self._save(folder, {"repo_type": repo_type or "model", "private": bool(private), "squashes": 0,
                            "commits": [{"message": "initial commit", "operations": [],
                                         "tree": {".gitattributes": gitattributes}}]})
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id: str, operations: Iterable[Any], *, commit_message: str,
                      repo_type: str | None = None, **_: Any) -> SimpleNamespace:
        folder, state = self._load(repo_id, repo_type)
        tree = dict(state["commits"][-1]["tree"])
        recorded = []
        for operation in operations:
            if isinstance(operation, CommitOperationAdd):
                with operation.as_file() as handle:
                    sha = self._store_blob(folder, handle.read())
                tree[operation.path_in_repo] = sha
                recorded.append({"op": "add", "path": operation.path_in_repo, "sha": sha})
            elif isinstance(operation, CommitOperationDelete):
                if operation.path_in_repo not in tree:
                    raise EntryNotFoundError(f"{operation.path_in_repo} is not in {repo_id}")
                del tree[operation.path_in_repo]
                recorded.append({"op": "delete", "path": operation.path_in_repo})
            else:
                raise TypeError(f"not a commit operation: {operation!r}")
        state["commits"].append({"message": commit_message, "operations": recorded, "tree": tree})
        self._save(folder, state)
        self._journal(folder, {"commit": commit_message, "operations": recorded})
        return SimpleNamespace(oid=str(len(state["commits"])), commit_message=commit_message)

    def list_repo_files(self, repo_id: str, *, repo_type: str | None = None, **_: Any) -> list[str]:
        _, state = self._load(repo_id, repo_type)
        return sorted(state["commits"][-1]["tree"])

    def hf_hub_download(self, repo_id: str, filename: str, *, repo_type: str | None = None,
                        local_dir: str | Path | None = None, **_: Any) -> str:
        folder, state = self._load(repo_id, repo_type)
        tree = state["commits"][-1]["tree"]
        if filename not in tree:
            raise EntryNotFoundError(f"{filename} is not in {repo_id}")
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=".download-", dir=target.parent)
        with os.fdopen(fd, "wb") as handle:
            handle.write((folder / "objects" / tree[filename]).read_bytes())
        os.replace(temporary, target)
        return str(target)

    def super_squash_history(self, repo_id: str, *, branch: str | None = None, commit_message: str | None = None,
                             repo_type: str | None = None, **_: Any) -> None:
        folder, state = self._load(repo_id, repo_type)
        tree = state["commits"][-1]["tree"]
        state["commits"] = [{"message": commit_message or "Super-squash branch", "operations": [], "tree": tree}]
        state["squashes"] += 1
        self._save(folder, state)
        self._journal(folder, {"squash": commit_message})
        for blob in (folder / "objects").iterdir():
            if blob.name not in set(tree.values()):
                blob.unlink()

    # -- for tests --

    def state(self, repo_id: str) -> dict:
        return json.loads((self._folder(repo_id) / "state.json").read_text())

    def journal(self, repo_id: str) -> list[dict]:
        """Every commit and squash made, in order (kept apart from the history, which a squash rewrites)."""
        path = self._folder(repo_id) / "journal.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def commits_made(self, repo_id: str) -> list[dict]:
        return [entry for entry in self.journal(repo_id) if "commit" in entry]

    def files(self, repo_id: str) -> dict[str, bytes]:
        """The repo's files now: path -> content."""
        folder = self._folder(repo_id)
        return {path: (folder / "objects" / sha).read_bytes()
                for path, sha in self.state(repo_id)["commits"][-1]["tree"].items()}

    def all_contents(self, repo_id: str) -> list[bytes]:
        """Every content any commit of the history can give back."""
        return [blob.read_bytes() for blob in (self._folder(repo_id) / "objects").iterdir() if blob.is_file()]

    # -- storage --

    def _folder(self, repo_id: str) -> Path:
        return self.root / repo_id.replace("/", "--")

    def _load(self, repo_id: str, repo_type: str | None) -> tuple[Path, dict]:
        folder = self._folder(repo_id)
        if not (folder / "state.json").is_file():
            raise _not_found(repo_id)
        state = json.loads((folder / "state.json").read_text())
        if state["repo_type"] != (repo_type or "model"):  # the Hub looks a repo up with its type
            raise _not_found(repo_id)
        return folder, state

    @staticmethod
    def _journal(folder: Path, entry: dict) -> None:
        with open(folder / "journal.jsonl", "a") as handle:
            handle.write(json.dumps(entry) + "\n")

    @staticmethod
    def _store_blob(folder: Path, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        target = folder / "objects" / sha
        if not target.exists():
            fd, temporary = tempfile.mkstemp(prefix=".blob-", dir=target.parent)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        return sha

    @staticmethod
    def _save(folder: Path, state: dict) -> None:
        fd, temporary = tempfile.mkstemp(prefix=".state-", dir=folder)
        with os.fdopen(fd, "w") as handle:
            json.dump(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, folder / "state.json")


def _not_found(repo_id: str) -> RepositoryNotFoundError:
    response = httpx2.Response(404, request=httpx2.Request("GET", f"http://127.0.0.1/api/datasets/{repo_id}"))
    return RepositoryNotFoundError(f"Repository not found: {repo_id}", response=response)
