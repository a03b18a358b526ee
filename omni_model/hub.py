"""Download a checkpoint from the Hugging Face Hub or ModelScope, resumable, checked against the hub's own hashes.

The real clients do the transfer (``huggingface_hub.snapshot_download`` / ``modelscope.snapshot_download`` into
``local_dir``), so their own resume logic applies:

* huggingface_hub 2.4: a body cut mid-transfer is resumed inside the call with a ``Range`` request; a call that
  fails keeps every finished file (recorded in ``out_dir/.cache/huggingface/download/*.metadata``), so the next call
  fetches only the missing ones. (A half-received file is *not* kept across processes by this version: its temporary
  file is process-unique and removed on failure.)
* modelscope 1.40 (modelscope-hub): a half-received file stays as ``<file>.incomplete`` and is resumed with a
  ``Range`` request, inside the call and by the next call (also after the process was killed).

Both clients' scratch state lives inside ``out_dir/.cache/`` (hidden), nothing is written to ``~/.cache``.

Before downloading, the hub's own listing is read at the same revision: ``{path: {"size", "sha256"}}`` (HF: the LFS
sha256, ``None`` for a plain git file, for which ``"git_sha1"`` -- the git blob id the hub reports -- is given instead;
ModelScope: its ``Sha256`` field). After downloading every file is checked against it; a missing, truncated or
corrupted file is deleted together with the client's local metadata for it and fetched again; if it is still wrong,
it is deleted and :class:`HubIntegrityError` names it. A bad file is never kept.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)

SOURCES = ("huggingface", "modelscope")
HF_DEFAULT_ENDPOINT = "https://huggingface.co"
MS_DEFAULT_ENDPOINT = "https://modelscope.cn"
MS_INTL_ENDPOINT = "https://www.modelscope.ai"
_CHUNK = 1 << 22


# ----------------------------------------------------------------------------------------------------------- errors
class HubError(RuntimeError):
    """A hub download failed; the message names the source, repo id, revision and endpoint."""

    def __init__(self, message: str, *, source: str, repo_id: str, revision: str | None, endpoint: str | None,
                 files: Iterable[str] = ()):
        self.source, self.repo_id, self.revision, self.endpoint = source, repo_id, revision, endpoint
        self.files = list(files)
        where = f"{source} repo '{repo_id}' at revision '{revision or '(default)'}' on {endpoint or '(default endpoint)'}"
        super().__init__(f"{message} [{where}]")


class HubUnreachableError(HubError):
    """The endpoint did not answer at all (connection refused, DNS, timeout)."""


class HubRepoNotFoundError(HubError):
    """The hub says the repo does not exist (or is private/gated without a valid token)."""


class HubRevisionNotFoundError(HubError):
    """The repo exists but the revision (branch, tag, commit) does not."""


class HubNoMatchingFilesError(HubError):
    """No file of the repo matches the allow-patterns."""


class HubIntegrityError(HubError):
    """Files still disagree with the hub's size/sha256 after a re-fetch (they have been deleted)."""


class HubDownloadError(HubError):
    """Any other failure of the client during the transfer (finished files are kept for the next attempt)."""


# ------------------------------------------------------------------------------------------------------ public API
def fetch_from_hub(source: str, repo_id: str, revision: str | None, allow_patterns: list[str] | None,
                   out_dir: Path, endpoint: str | None = None, *, repair: bool = True,
                   max_workers: int = 4) -> dict[str, dict]:
    """Download ``repo_id@revision`` (files matching ``allow_patterns``) into ``out_dir`` with the real client.

    Resumes what an earlier, interrupted call left behind. Returns the hub's view of each selected file,
    ``{relative_path: {"size": int, "sha256": str | None, ...}}``, and guarantees that every one of those files
    is on disk and matches it (else raises; with ``repair=False`` the mismatch is only reported by
    :func:`verify_against_hub`, nothing is re-fetched).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    patterns = list(allow_patterns) if allow_patterns else None
    ctx = _Context(source, repo_id, revision, endpoint)
    _check_reachable(ctx)
    hub_files, pinned = _list_hub_files(ctx, patterns)
    _download(ctx, pinned, patterns, out_dir, max_workers)
    problems = _problems_by_file(out_dir, hub_files)
    if problems and not repair:
        raise ctx.error(HubIntegrityError, "files disagree with the hub (repair=False, left in place): "
                        + "; ".join(f"{rel}: {what}" for rel, what in problems.items()), problems)
    if problems:
        log.warning("%s: %d file(s) disagree with the hub, fetching them again: %s",
                    repo_id, len(problems), "; ".join(f"{rel}: {what}" for rel, what in problems.items()))
        _repair(ctx, pinned, out_dir, hub_files, list(problems), max_workers)
    return hub_files


def list_hub_files(source: str, repo_id: str, revision: str | None, allow_patterns: list[str] | None = None,
                   endpoint: str | None = None) -> dict[str, dict]:
    """The hub's view of the repo's files (filtered by ``allow_patterns``), without downloading anything."""
    ctx = _Context(source, repo_id, revision, endpoint)
    _check_reachable(ctx)
    return _list_hub_files(ctx, list(allow_patterns) if allow_patterns else None)[0]


def verify_against_hub(out_dir: Path, hub_files: dict[str, dict]) -> list[str]:
    """Problems of ``out_dir`` against the hub's view, one ``"<path>: <what>"`` string each (empty: all good).

    Checks presence, size, and the content hash the hub gives: ``sha256`` (LFS / ModelScope) or else ``git_sha1``
    (the git blob id of a plain HF file). Files not listed in ``hub_files`` are ignored.
    """
    return [f"{rel}: {what}" for rel, what in _problems_by_file(Path(out_dir), hub_files).items()]


def _problems_by_file(out_dir: Path, hub_files: dict[str, dict]) -> dict[str, str]:
    problems = {}
    for rel, meta in sorted(hub_files.items()):
        path = out_dir / rel
        if not path.is_file():
            problems[rel] = "missing"
            continue
        size = path.stat().st_size
        if meta.get("size") is not None and size != meta["size"]:
            problems[rel] = f"size {size} bytes, the hub says {meta['size']}"
            continue
        if meta.get("sha256"):
            actual = _file_digest(path, "sha256")
            if actual != meta["sha256"]:
                problems[rel] = f"sha256 {actual}, the hub says {meta['sha256']}"
        elif meta.get("git_sha1"):
            actual = _git_blob_sha1(path)
            if actual != meta["git_sha1"]:
                problems[rel] = f"git blob sha1 {actual}, the hub says {meta['git_sha1']}"
    return problems


def repair_from_hub(source: str, repo_id: str, revision: str | None, out_dir: Path, hub_files: dict[str, dict],
                    endpoint: str | None = None, *, max_workers: int = 4) -> list[str]:
    """Re-fetch every file of ``out_dir`` that disagrees with ``hub_files``; returns the repaired paths.

    Raises :class:`HubIntegrityError` (after deleting them) for files that are still wrong after the re-fetch.
    """
    problems = _problems_by_file(Path(out_dir), hub_files)
    if not problems:
        return []
    ctx = _Context(source, repo_id, revision, endpoint)
    _check_reachable(ctx)
    pinned = revision
    if source == "huggingface":
        pinned = _hf_resolve_commit(ctx)
    return _repair(ctx, pinned, Path(out_dir), hub_files, list(problems), max_workers)


def forget_local_file(source: str, out_dir: Path, rel: str) -> None:
    """Delete ``out_dir/rel`` and what the client keeps about it, so the next download cannot trust a stale copy."""
    out_dir = Path(out_dir)
    target = out_dir / rel
    target.unlink(missing_ok=True)
    # modelscope-hub: resumable partial file beside the target
    target.with_name(target.name + ".incomplete").unlink(missing_ok=True)
    target.with_name(target.name + ".parallel_tmp").unlink(missing_ok=True)
    # huggingface_hub local_dir metadata: .cache/huggingface/download/<rel>.metadata (+ .lock, partial downloads)
    meta_dir = out_dir / ".cache" / "huggingface" / "download"
    meta = meta_dir / f"{rel}.metadata"
    meta.unlink(missing_ok=True)
    meta.with_suffix(".lock").unlink(missing_ok=True)
    if meta.parent.is_dir():
        for partial in meta.parent.glob(f"{glob_escape(Path(rel).name)}.*.incomplete"):
            partial.unlink(missing_ok=True)


def glob_escape(name: str) -> str:
    """An fnmatch pattern that matches exactly ``name``."""
    return re.sub(r"([*?\[])", r"[\1]", name)


# -------------------------------------------------------------------------------------------------------- internals
class _Context:
    def __init__(self, source: str, repo_id: str, revision: str | None, endpoint: str | None):
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        self.source, self.repo_id, self.revision = source, repo_id, revision or None
        self.explicit_endpoint = endpoint.rstrip("/") if endpoint else None
        if source == "huggingface":
            self.endpoint = self.explicit_endpoint or os.environ.get("HF_ENDPOINT", "").rstrip("/") or HF_DEFAULT_ENDPOINT
        else:
            env = os.environ.get("MODELSCOPE_ENDPOINT", "").rstrip("/")
            self.endpoint = self.explicit_endpoint or env or MS_DEFAULT_ENDPOINT
            # Without an explicit endpoint the ModelScope client probes modelscope.cn and modelscope.ai itself.
            self.client_endpoint = self.explicit_endpoint or env or None

    def error(self, cls: type[HubError], message: str, files: Iterable[str] = ()) -> HubError:
        return cls(message, source=self.source, repo_id=self.repo_id, revision=self.revision,
                   endpoint=self.endpoint, files=files)


def _check_reachable(ctx: _Context) -> None:
    """Fail fast and clearly when nothing answers at the endpoint (the clients would retry with backoff first)."""
    if ctx.source == "huggingface":
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise ctx.error(HubUnreachableError, "HF_HUB_OFFLINE is set, so huggingface_hub will not download; "
                                                 "unset it (or set HF_HUB_OFFLINE=0)")
    if ctx.source == "modelscope" and ctx.client_endpoint is None:
        candidates = [MS_DEFAULT_ENDPOINT, MS_INTL_ENDPOINT]  # the client picks one of its two sites itself
    else:
        candidates = [ctx.endpoint]
    import requests

    failures = []
    for url in candidates:
        try:
            requests.head(url, timeout=(10, 30), allow_redirects=False)  # any HTTP answer means reachable
            return
        except (requests.ConnectionError, requests.Timeout) as exc:
            failures.append(f"{url}: {type(exc).__name__}: {_first_line(exc)}")
    raise ctx.error(HubUnreachableError, "the hub endpoint is unreachable (" + "; ".join(failures) + ")")


def _file_digest(path: Path, algo: str) -> str:
    digest = hashlib.new(algo)
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1()
    digest.update(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _list_hub_files(ctx: _Context, patterns: list[str] | None) -> tuple[dict[str, dict], str | None]:
    """(hub files matching ``patterns``, the revision to download them at: a commit for HF, else as given)."""
    if ctx.source == "huggingface":
        files, pinned = _hf_list(ctx)
        from huggingface_hub.utils import filter_repo_objects

        selected = set(filter_repo_objects(items=list(files), allow_patterns=patterns))
    else:
        files, pinned = _ms_list(ctx)
        selected = {p for p in files if patterns is None or _ms_matches(p, patterns)}
    if not selected:
        sample = ", ".join(sorted(files)[:12]) + (" ..." if len(files) > 12 else "")
        raise ctx.error(HubNoMatchingFilesError,
                        f"no file matches allow_patterns={patterns!r} (the repo has {len(files)} files: {sample})")
    return {p: files[p] for p in sorted(selected)}, pinned


def _ms_matches(path: str, patterns: list[str]) -> bool:
    # Same rule as modelscope-hub's own filter: fnmatch, and legacy regex-style ".*" read as "*".
    return any(fnmatch.fnmatch(path, p) or (".*" in p and fnmatch.fnmatch(path, p.replace(".*", "*")))
               for p in patterns)


# --- Hugging Face
def _hf_api(ctx: _Context):
    from huggingface_hub import HfApi

    return HfApi(endpoint=ctx.endpoint, library_name="omni-pipeline")


def _hf_call(ctx: _Context, fn, *args, **kwargs):
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    try:
        return fn(*args, **kwargs)
    except GatedRepoError as exc:
        raise ctx.error(HubRepoNotFoundError, f"the repo is gated: accept its terms and log in (HF_TOKEN) ({exc})") from exc
    except RepositoryNotFoundError as exc:
        raise ctx.error(HubRepoNotFoundError, "repository not found (or private without a valid token)") from exc
    except RevisionNotFoundError as exc:
        raise ctx.error(HubRevisionNotFoundError, "revision not found in this repository") from exc
    except (httpx2.ConnectError, httpx2.TimeoutException) as exc:
        raise ctx.error(HubUnreachableError, f"the hub endpoint is unreachable ({type(exc).__name__}: {exc})") from exc
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, httpx2.HTTPError) as exc:
        raise ctx.error(HubDownloadError, f"download failed: {type(exc).__name__}: {_first_line(exc)}") from exc


def _hf_resolve_commit(ctx: _Context) -> str:
    api = _hf_api(ctx)
    info = _hf_call(ctx, api.model_info, ctx.repo_id, revision=ctx.revision)
    if not info.sha:
        raise ctx.error(HubDownloadError, "the hub returned no commit sha for this revision")
    return info.sha


def _hf_list(ctx: _Context) -> tuple[dict[str, dict], str]:
    from huggingface_hub.hf_api import RepoFile

    commit = _hf_resolve_commit(ctx)
    api = _hf_api(ctx)
    entries = _hf_call(ctx, lambda: list(api.list_repo_tree(ctx.repo_id, recursive=True, revision=commit)))
    files = {}
    for entry in entries:
        if not isinstance(entry, RepoFile):
            continue
        if entry.lfs is not None:
            files[entry.path] = {"size": int(entry.lfs.size), "sha256": entry.lfs.sha256, "git_sha1": None}
        else:
            files[entry.path] = {"size": int(entry.size), "sha256": None, "git_sha1": entry.blob_id}
    return files, commit


def _hf_download(ctx: _Context, commit: str, patterns: list[str] | None, out_dir: Path, max_workers: int) -> None:
    from huggingface_hub import snapshot_download

    _hf_call(
        ctx,
        snapshot_download,
        ctx.repo_id,
        revision=commit,  # pinned: the files are those of the listing we return
        local_dir=out_dir,
        cache_dir=out_dir / ".cache" / "huggingface" / "hub",  # keep refs/locks out of ~/.cache
        allow_patterns=patterns,
        endpoint=ctx.endpoint,
        max_workers=max_workers,
        library_name="omni-pipeline",
    )


# --- ModelScope
def _ms_api(ctx: _Context):
    from modelscope_hub.api import HubApi

    return HubApi(endpoint=ctx.client_endpoint)


def _ms_call(ctx: _Context, fn, *args, **kwargs):
    import requests
    from modelscope_hub import errors as mse

    try:
        return fn(*args, **kwargs)
    except mse.FileDownloadError as exc:
        failed = dict(getattr(exc, "failed_files", None) or {})
        bad = sorted(p for p, e in failed.items() if isinstance(e, mse.FileIntegrityError))
        details = "; ".join(f"{p}: {type(e).__name__}: {_first_line(e)}" for p, e in sorted(failed.items()))
        if bad and len(bad) == len(failed):
            raise ctx.error(HubIntegrityError, f"the hub kept serving content that does not match its own "
                                               f"size/sha256 for {', '.join(bad)} ({details})", bad) from exc
        raise ctx.error(HubDownloadError, f"{len(failed)} file(s) failed: {details}", sorted(failed)) from exc
    except mse.FileIntegrityError as exc:
        raise ctx.error(HubIntegrityError, f"content does not match the hub's size/sha256: {_first_line(exc)}") from exc
    except mse.NotExistError as exc:
        raise _ms_not_found(ctx, exc) from exc
    except requests.HTTPError as exc:  # the compat layer re-raises NotExist/auth errors as requests.HTTPError
        cause = exc.__cause__
        if isinstance(cause, mse.NotExistError):
            raise _ms_not_found(ctx, cause) from exc
        raise ctx.error(HubDownloadError, f"download failed: {_first_line(exc)}") from exc
    except (mse.NetworkError, mse.RequestTimeoutError, requests.ConnectionError, requests.Timeout) as exc:
        raise ctx.error(HubUnreachableError, f"the hub endpoint is unreachable ({type(exc).__name__}: "
                                             f"{_first_line(exc)})") from exc
    except (mse.HubError, requests.RequestException, OSError) as exc:
        raise ctx.error(HubDownloadError, f"download failed: {type(exc).__name__}: {_first_line(exc)}") from exc


def _ms_not_found(ctx: _Context, exc: Exception) -> HubError:
    """Tell a missing repo from a missing revision: ask for the repo itself."""
    from modelscope_hub import errors as mse

    try:
        _ms_api(ctx).legacy.get_repo_info(ctx.repo_id, "model")
    except mse.NotExistError:
        return ctx.error(HubRepoNotFoundError, f"repository not found ({_first_line(exc)})")
    except Exception:  # noqa: BLE001 - fall through to the revision message, the listing said "not found"
        pass
    return ctx.error(HubRevisionNotFoundError, f"revision not found in this repository ({_first_line(exc)})")


def _ms_list(ctx: _Context) -> tuple[dict[str, dict], str | None]:
    api = _ms_api(ctx)
    if ctx.client_endpoint is None:
        endpoint = _ms_call(ctx, api.resolve_endpoint_for_read, ctx.repo_id, repo_type="model")
        ctx.client_endpoint = ctx.endpoint = endpoint.rstrip("/")
        api = _ms_api(ctx)
    entries = _ms_call(ctx, api.list_repo_files, ctx.repo_id, "model", revision=ctx.revision, recursive=True)
    files = {}
    for entry in entries:
        if entry.is_dir or not entry.path:
            continue
        files[entry.path] = {"size": int(entry.size), "sha256": entry.sha256 or None}
    return files, ctx.revision


def _ms_download(ctx: _Context, revision: str | None, patterns: list[str] | None, out_dir: Path,
                 max_workers: int) -> None:
    from modelscope import snapshot_download

    _ms_call(
        ctx,
        snapshot_download,
        repo_id=ctx.repo_id,
        revision=revision,
        local_dir=str(out_dir),
        cache_dir=str(out_dir / ".cache" / "modelscope"),  # its lock files; keeps ~/.cache untouched
        allow_patterns=patterns,
        endpoint=ctx.client_endpoint,
        max_workers=max_workers,
    )


# --- both
def _download(ctx: _Context, pinned: str | None, patterns: list[str] | None, out_dir: Path, max_workers: int) -> None:
    if ctx.source == "huggingface":
        _hf_download(ctx, pinned, patterns, out_dir, max_workers)
    else:
        _ms_download(ctx, pinned, patterns, out_dir, max_workers)


def _repair(ctx: _Context, pinned: str | None, out_dir: Path, hub_files: dict[str, dict], bad: list[str],
            max_workers: int) -> list[str]:
    bad = sorted(bad)
    for rel in bad:
        forget_local_file(ctx.source, out_dir, rel)
    _download(ctx, pinned, [glob_escape(rel) for rel in bad], out_dir, max_workers)
    still = _problems_by_file(out_dir, {rel: hub_files[rel] for rel in bad})
    if still:
        for rel in still:
            forget_local_file(ctx.source, out_dir, rel)
        raise ctx.error(HubIntegrityError, "still wrong after a re-fetch, deleted: "
                        + "; ".join(f"{rel}: {what}" for rel, what in still.items()), sorted(still))
    log.info("%s: re-fetched %s", ctx.repo_id, ", ".join(bad))
    return bad


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    text = " / ".join(lines[:3]) if lines else type(exc).__name__
    return text if len(text) <= 600 else text[:600] + " ..."
