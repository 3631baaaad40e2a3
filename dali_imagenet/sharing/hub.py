"""The Hugging Face Hub: a published folder uploaded as one commit to a model repo (created if
needed; every earlier commit stays a revision one can load), and a Space. The token is `HF_TOKEN`
or the one `hf auth login` saved; `HF_ENDPOINT` names another Hub.

Who can see it: a new repo gets the namespace's default (public for a user; an organisation may
make its repos private by default) unless `private` asks for private; the visibility a repo ends
with is read back from the Hub, never assumed. An existing public repo stays public: `private`
on it is refused in one line unless `make_private` asks to change it. A repo that must be private
(a Space holding a private model's weights) is never written while it is public. Every failure
is one line that says what failed (`hub_errors`)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dali_imagenet.run.hub_errors import describe, endpoint
from dali_imagenet.sharing.folder import PublishError

PREFIX = {"model": "", "space": "spaces/", "dataset": "datasets/"}


@dataclass
class Pushed:
    repo_id: str
    url: str  # the repo's page
    commit: str  # the commit's id: hf://REPO@COMMIT loads exactly this upload
    private: bool  # as the Hub has it after the upload
    note: str = ""  # how its visibility came about, when not plainly asked


def connect():
    """An `HfApi` whose token the Hub takes; raises, in one line, before anything is built."""
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        raise PublishError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login`")
    api = HfApi(token=token, endpoint=os.environ.get("HF_ENDPOINT"))  # as it is now, not at import
    try:
        api.whoami()
    except Exception as error:  # noqa: BLE001 - huggingface_hub's HTTP and transport errors: said in one line
        raise PublishError(describe(error, endpoint())) from None
    return api


def visibility(api, repo_id: str, kind: str = "model") -> bool | None:
    """Whether the repo is private; None when it does not exist (yet)."""
    from huggingface_hub.errors import RepositoryNotFoundError

    if repo_id.count("/") != 1:
        raise PublishError(f"{repo_id}: a Hub repo is USER/NAME")
    try:
        return bool(api.repo_info(repo_id, repo_type=kind).private)
    except RepositoryNotFoundError:
        return None
    except Exception as error:  # noqa: BLE001 - the network, the token: one line
        raise PublishError(describe(error, repo_id)) from None


def check_private(repo_id: str, private_now: bool | None, *, make_private: bool, why: str) -> None:
    """Refuses, in one line, to write to a public repo that must be private."""
    if private_now is False and not make_private:
        raise PublishError(f"{repo_id} exists and is public: {why}; pass --make-private to make it private "
                           f"first, or name another repo")


def push(api, folder: Path, repo_id: str, *, kind: str = "model", private: bool = False, make_private: bool = False,
         message: str, space_sdk: str | None = None, replace: bool = False) -> Pushed:
    """`folder` as one commit to `repo_id`, created when missing. `private`: it must be private
    (created so; an existing public one is refused, or made private first with `make_private`);
    otherwise a new repo takes its namespace's default. `replace`: files of the repo that the
    folder does not hold are removed in the same commit (a Space's stale files); otherwise its
    files replace those of the same names and nothing else is removed."""
    before = visibility(api, repo_id, kind)
    if private:
        check_private(repo_id, before, make_private=make_private, why="its files would be public")
    try:
        if before is None:
            api.create_repo(repo_id, repo_type=kind, private=True if private else None, exist_ok=True,
                            space_sdk=space_sdk)
        elif private and not before:
            api.update_repo_settings(repo_id, repo_type=kind, visibility="private")
        after = visibility(api, repo_id, kind)
        if private and not after:  # never upload what must be private to a public repo
            raise PublishError(f"{repo_id}: the Hub has it public though it was asked private; nothing uploaded")
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=kind, commit_message=message,
                                 delete_patterns="*" if replace else None)
    except PublishError:
        raise
    except Exception as error:  # noqa: BLE001 - a refused write, a name taken, the size, the network: one line
        raise PublishError(describe(error, repo_id)) from None
    note = ("made private" if private and before is False else
            "its namespace's default" if before is None and not private and after else "")
    return Pushed(repo_id, f"{api.endpoint}/{PREFIX[kind]}{repo_id}", info.oid, bool(after), note)
