"""omni_model.hub against a loopback hub (tests/hub_server.py) in both layouts, with the real, unmodified clients.

Nothing here reaches a real hub: every call gets the loopback endpoint explicitly, HOME / HF_HOME /
MODELSCOPE_CACHE / MODELSCOPE_HOME point into tmp, and the tests check that no client wrote to the real caches.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from omni_model.hub import (
    HubIntegrityError,
    HubNoMatchingFilesError,
    HubRepoNotFoundError,
    HubRevisionNotFoundError,
    HubUnreachableError,
    fetch_from_hub,
    repair_from_hub,
    verify_against_hub,
)

from hub_server import HubServer  # tests/ is on sys.path (rootdir conftest, no package)

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "omni-test/tiny-omni"
SOURCES = ["huggingface", "modelscope"]
BIG = "model.safetensors"  # 47 MB, LFS on both hubs: served through the CDN redirect
REAL_HOME = Path.home()


def _default_revision(source: str) -> str:
    return "main" if source == "huggingface" else "master"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _checkpoint_files(folder: Path) -> list[str]:
    """Files of a downloaded folder, without the clients' hidden scratch state."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory):
    """Point every client cache/config/home into tmp for this module; refuse to run if HF offline mode is frozen on."""
    root = tmp_path_factory.mktemp("hub_env")
    env = {
        "HOME": root / "home",
        "HF_HOME": root / "hf_home",
        "MODELSCOPE_CACHE": root / "ms_cache",
        "MODELSCOPE_HOME": root / "ms_home",
    }
    mp = pytest.MonkeyPatch()
    for key, value in env.items():
        value.mkdir()
        mp.setenv(key, str(value))
    mp.setenv("HF_HUB_OFFLINE", "0")
    mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    mp.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    mp.setenv("DO_NOT_TRACK", "1")
    for key in ("HF_ENDPOINT", "MODELSCOPE_ENDPOINT", "MODELSCOPE_DOMAIN", "HF_TOKEN", "MODELSCOPE_API_TOKEN"):
        mp.delenv(key, raising=False)
    # ModelScope keeps a process-wide default config built from the environment on first use: rebuild it from ours.
    from modelscope_hub import config as ms_config

    ms_config.set_default_config(None)
    from huggingface_hub import constants

    if constants.is_offline_mode():
        mp.undo()
        pytest.skip("huggingface_hub was imported with HF_HUB_OFFLINE=1 (frozen at import); run with HF_HUB_OFFLINE=0")
    yield env
    mp.undo()
    ms_config.set_default_config(None)
    # Nothing landed in the real caches.
    assert not list((REAL_HOME / ".cache" / "huggingface" / "hub").glob("models--omni-test--*"))
    assert not list(Path(constants.HF_HUB_CACHE).glob("models--omni-test--*"))
    assert not list((REAL_HOME / ".cache" / "modelscope").rglob("omni-test*"))
    # ... nor in the tmp homes: the clients' scratch state stays inside the download folder.
    assert not (env["HOME"] / ".cache").exists()
    assert not any(env["MODELSCOPE_CACHE"].iterdir())
    assert not any(env["HF_HOME"].iterdir())


@pytest.fixture
def hub(hub_env, tiny_hf_dir):
    with HubServer({REPO_ID: tiny_hf_dir}, tree_page_size=4) as server:  # small pages: HF pagination is exercised
        yield server


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _assert_names_context(exc: Exception, source: str, revision: str, endpoint: str, repo_id: str = REPO_ID):
    text = str(exc)
    assert repo_id in text and revision in text and endpoint in text and source in text, text


# ------------------------------------------------------------------------------------------------ full fetch
@pytest.mark.parametrize("source", SOURCES)
def test_full_fetch_is_byte_identical_and_reports_hub_hashes(source, hub, tiny_hf_dir, tmp_path):
    out = tmp_path / "ckpt"
    rev = _default_revision(source)
    hub_files = fetch_from_hub(source, REPO_ID, rev, ["*"], out, endpoint=hub.url)

    expected = _checkpoint_files(tiny_hf_dir)
    assert sorted(hub_files) == expected == _checkpoint_files(out)
    for rel in expected:
        src, got = tiny_hf_dir / rel, out / rel
        assert got.stat().st_size == src.stat().st_size == hub_files[rel]["size"], rel
        assert _sha256(got) == _sha256(src), rel
        served = hub.repos[REPO_ID].files[rel]
        if source == "modelscope" or served.lfs:
            assert hub_files[rel]["sha256"] == _sha256(src), rel  # the hub's own sha256 (LFS oid / Sha256 field)
        else:
            assert hub_files[rel]["sha256"] is None and hub_files[rel]["git_sha1"] == served.git_oid, rel
    assert hub_files[BIG]["sha256"] == _sha256(tiny_hf_dir / BIG)
    assert verify_against_hub(out, hub_files) == []
    if source == "huggingface":  # the listing was paged (4 entries a page) and the LFS file came from the CDN
        assert sum(1 for r in hub.log if "/tree/" in r.path) >= 3
    assert [r.server for r in hub.gets(BIG)] == ["cdn"]

    # A second call finds everything in place: no file body is downloaded again.
    hub.reset_log()
    assert fetch_from_hub(source, REPO_ID, rev, ["*"], out, endpoint=hub.url) == hub_files
    assert [r for r in hub.log if r.file and r.status in (200, 206) and r.method == "GET"] == []


@pytest.mark.parametrize("source", SOURCES)
def test_allow_patterns_are_honoured(source, hub, tiny_hf_dir, tmp_path):
    out = tmp_path / "ckpt"
    hub_files = fetch_from_hub(source, REPO_ID, _default_revision(source), ["*.json"], out, endpoint=hub.url)
    jsons = [rel for rel in _checkpoint_files(tiny_hf_dir) if rel.endswith(".json")]
    assert len(jsons) >= 4
    assert sorted(hub_files) == jsons == _checkpoint_files(out)
    for rel in _checkpoint_files(tiny_hf_dir):
        assert hub.count(rel) == (1 if rel in jsons else 0), rel  # nothing else was even requested
        if rel in jsons:
            assert (out / rel).read_bytes() == (tiny_hf_dir / rel).read_bytes()


@pytest.mark.parametrize("source", SOURCES)
def test_no_file_matching_the_patterns_is_a_clear_error(source, hub, tmp_path):
    rev = _default_revision(source)
    with pytest.raises(HubNoMatchingFilesError, match=r"\*\.gguf") as info:
        fetch_from_hub(source, REPO_ID, rev, ["*.gguf"], tmp_path / "ckpt", endpoint=hub.url)
    _assert_names_context(info.value, source, rev, hub.url)
    assert "config.json" in str(info.value)  # lists what the repo does have
    assert not any(hub.gets(rel) for rel in hub.repos[REPO_ID].files)


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("source", SOURCES)
def test_cut_download_resumes_with_a_range_request(source, hub, tiny_hf_dir, tmp_path):
    """The connection drops after 20 MB of 47 MB; the client resumes from its partial file with a Range request."""
    out = tmp_path / "ckpt"
    cut_at = 20_000_000
    hub.cut(BIG, after=cut_at)
    fetch_from_hub(source, REPO_ID, _default_revision(source), [BIG], out, endpoint=hub.url)

    assert _sha256(out / BIG) == _sha256(tiny_hf_dir / BIG)
    first, second = hub.gets(BIG)  # exactly two body requests
    assert first.fault == "cut" and first.range is None and first.sent == cut_at
    assert second.status == 206 and second.range is not None and second.range.startswith("bytes=")
    resumed_from = int(second.range[len("bytes="):].split("-")[0])
    # huggingface_hub keeps whole 10 MB chunks (resumes at 10485760), modelscope keeps every byte it got (20000000)
    assert 0 < resumed_from <= cut_at
    assert second.sent == (tiny_hf_dir / BIG).stat().st_size - resumed_from


_CHILD = """
import sys
from pathlib import Path
from omni_model.hub import fetch_from_hub
fetch_from_hub(sys.argv[1], sys.argv[2], sys.argv[3], None, Path(sys.argv[4]), endpoint=sys.argv[5])
"""


@pytest.mark.parametrize("source", SOURCES)
def test_killed_download_resumes_in_the_next_process(source, hub, tiny_hf_dir, tmp_path):
    """A download process is SIGKILLed mid-file; the next call picks up what the client kept.

    modelscope keeps `<file>.incomplete` and resumes it with a Range request; huggingface_hub 2.4 keeps the finished
    files (not the half file: its temp file is process-unique) and fetches only what is missing.
    """
    out = tmp_path / "ckpt"
    rev = _default_revision(source)
    hub.stall(BIG, after=25_000_000)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, source, REPO_ID, rev, str(out), hub.url],
                             cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        hub.wait_stalled(BIG, timeout=60)
        small = [rel for rel in _checkpoint_files(tiny_hf_dir) if rel != BIG]
        deadline = time.monotonic() + 30  # let the small files finish (they are not stalled)
        while time.monotonic() < deadline and not all((out / rel).is_file() for rel in small):
            time.sleep(0.05)
        time.sleep(0.3)  # the client flushes what it received
    finally:
        child.kill()
        child.wait(timeout=30)
        hub.release()
    assert child.returncode != 0
    assert not (out / BIG).exists()
    partial = out / (BIG + ".incomplete")
    kept = partial.stat().st_size if partial.exists() else 0

    before = {rel: hub.count(rel) for rel in _checkpoint_files(tiny_hf_dir)}
    hub_files = fetch_from_hub(source, REPO_ID, rev, None, out, endpoint=hub.url)
    assert verify_against_hub(out, hub_files) == []
    assert _sha256(out / BIG) == _sha256(tiny_hf_dir / BIG)
    for rel in _checkpoint_files(tiny_hf_dir):
        if rel != BIG:
            assert hub.count(rel) == before[rel], f"{rel} was downloaded again"
    last = hub.gets(BIG)[-1]
    assert hub.count(BIG) == before[BIG] + 1
    if source == "modelscope":
        assert kept > 0 and last.range == f"bytes={kept}-" and last.status == 206
        assert last.sent == (tiny_hf_dir / BIG).stat().st_size - kept
    else:
        assert last.range is None and last.status == 200  # whole file again: documented limitation of the client


# ------------------------------------------------------------------------------------------------ integrity
@pytest.mark.parametrize("damage", ["flip_bytes_keep_mtime", "truncate"])
@pytest.mark.parametrize("source", SOURCES)
def test_damaged_local_file_is_detected_and_refetched(source, damage, hub, tiny_hf_dir, tmp_path):
    out = tmp_path / "ckpt"
    rev = _default_revision(source)
    hub_files = fetch_from_hub(source, REPO_ID, rev, [BIG, "config.json"], out, endpoint=hub.url)
    target = out / BIG
    stat = target.stat()
    if damage == "truncate":
        with open(target, "r+b") as handle:
            handle.truncate(stat.st_size // 3)
    else:  # silent bit rot: same size, same mtime, so the client's own "is it up to date" metadata still matches
        with open(target, "r+b") as handle:
            handle.seek(stat.st_size // 2)
            handle.write(b"\x00" * 4096)
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    problems = verify_against_hub(out, hub_files)
    assert len(problems) == 1 and problems[0].startswith(f"{BIG}: ")
    assert ("size" if damage == "truncate" else "sha256") in problems[0]

    if source == "huggingface" and damage == "flip_bytes_keep_mtime":
        # The client alone trusts its metadata and keeps the rotten file: only our check catches it.
        with pytest.raises(HubIntegrityError, match="repair=False") as info:
            fetch_from_hub(source, REPO_ID, rev, [BIG, "config.json"], out, endpoint=hub.url, repair=False)
        assert info.value.files == [BIG] and verify_against_hub(out, hub_files) == problems

    gets_before = hub.count(BIG)
    assert fetch_from_hub(source, REPO_ID, rev, [BIG, "config.json"], out, endpoint=hub.url) == hub_files
    assert verify_against_hub(out, hub_files) == []
    assert _sha256(target) == _sha256(tiny_hf_dir / BIG)
    assert hub.count(BIG) == gets_before + 1  # re-fetched once
    assert hub.count("config.json") == 1  # the good file was left alone


@pytest.mark.parametrize(
    "source,rel",
    [("huggingface", BIG), ("huggingface", "config.json"), ("modelscope", BIG)],
    ids=["hf-lfs-sha256", "hf-git-sha1", "ms-sha256"],
)
def test_server_serving_corrupt_bytes_ends_in_a_clear_error(source, rel, hub, tmp_path):
    out = tmp_path / "ckpt"
    rev = _default_revision(source)
    hub.corrupt(rel)  # every time, right size, wrong content
    with pytest.raises(HubIntegrityError) as info:
        fetch_from_hub(source, REPO_ID, rev, [rel, "generation_config.json"], out, endpoint=hub.url)
    _assert_names_context(info.value, source, rev, hub.url)
    assert rel in str(info.value) and info.value.files == [rel]
    assert hub.count(rel) >= 2  # it was fetched again before giving up
    assert not (out / rel).exists()  # the bad file is not kept ...
    assert not (out / (rel + ".incomplete")).exists()
    assert (out / "generation_config.json").is_file()  # ... the good one is


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("source", SOURCES)
def test_unknown_repo_is_a_clear_error(source, hub, tmp_path):
    rev = _default_revision(source)
    with pytest.raises(HubRepoNotFoundError, match="not found") as info:
        fetch_from_hub(source, "omni-test/no-such-model", rev, ["*"], tmp_path / "ckpt", endpoint=hub.url)
    _assert_names_context(info.value, source, rev, hub.url, repo_id="omni-test/no-such-model")


@pytest.mark.parametrize("source", SOURCES)
def test_unknown_revision_is_a_clear_error(source, hub, tmp_path):
    with pytest.raises(HubRevisionNotFoundError, match="revision not found") as info:
        fetch_from_hub(source, REPO_ID, "no-such-branch", ["*"], tmp_path / "ckpt", endpoint=hub.url)
    _assert_names_context(info.value, source, "no-such-branch", hub.url)


@pytest.mark.parametrize("source", SOURCES)
def test_unreachable_endpoint_is_a_clear_error(source, hub_env, tmp_path):
    url = _closed_port_url()
    start = time.monotonic()
    with pytest.raises(HubUnreachableError, match="unreachable") as info:
        fetch_from_hub(source, REPO_ID, _default_revision(source), ["*"], tmp_path / "ckpt", endpoint=url)
    _assert_names_context(info.value, source, _default_revision(source), url)
    assert time.monotonic() - start < 10  # no long client backoff before saying so


# ------------------------------------------------------------------------------------------------ nested paths
@pytest.mark.parametrize("source", SOURCES)
def test_nested_paths_pattern_and_repair(source, hub, tmp_path):
    """Sub-folders: HF recursive tree / ModelScope `Root`-scoped listing, nested client metadata in the repair."""
    src = tmp_path / "src"
    files = {"sub/dir/weights.bin": os.urandom(300_000), "sub/notes.txt": b"hello\n", "top.json": b"{}"}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    hub.add_repo("omni-test/nested", src)
    out = tmp_path / "ckpt"
    rev = _default_revision(source)
    hub_files = fetch_from_hub(source, "omni-test/nested", rev, ["sub/*"], out, endpoint=hub.url)
    assert sorted(hub_files) == ["sub/dir/weights.bin", "sub/notes.txt"] == _checkpoint_files(out)
    assert all((out / rel).read_bytes() == files[rel] for rel in hub_files)
    if source == "modelscope":
        assert any("Root=sub" in r.query for r in hub.log if r.path.endswith("/repo/files"))

    target = out / "sub/dir/weights.bin"
    stat = target.stat()
    target.write_bytes(b"\x00" * stat.st_size)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert [p.split(": ")[0] for p in verify_against_hub(out, hub_files)] == ["sub/dir/weights.bin"]
    fetch_from_hub(source, "omni-test/nested", rev, ["sub/*"], out, endpoint=hub.url)
    assert target.read_bytes() == files["sub/dir/weights.bin"]
    assert hub.count("sub/dir/weights.bin") == 2 and hub.count("sub/notes.txt") == 1

    # The same repair on its own, for a folder checked later (e.g. by the download stage before reuse).
    (out / "sub/notes.txt").write_bytes(b"HELLO\n")
    assert repair_from_hub(source, "omni-test/nested", rev, out, hub_files, endpoint=hub.url) == ["sub/notes.txt"]
    assert (out / "sub/notes.txt").read_bytes() == files["sub/notes.txt"] and verify_against_hub(out, hub_files) == []
    assert repair_from_hub(source, "omni-test/nested", rev, out, hub_files, endpoint=hub.url) == []


# ------------------------------------------------------------------------------------------------ contract with download.py
@pytest.mark.parametrize("source", SOURCES)
def test_download_stage_over_the_loopback_hub(source, hub, tiny_hf_dir, tmp_path):
    """The lead's download stage (omni_model.download) on top of this module: manifest == hub hashes, damage refetched."""
    from omni_model.download import fetch_checkpoint, verify_manifest

    cfg = {"source": source, "id": REPO_ID, "revision": _default_revision(source), "endpoint": hub.url}
    out = tmp_path / "results" / "model" / "hf"
    manifest = fetch_checkpoint(cfg, out, log=lambda *_: None)
    assert verify_manifest(out) == []
    assert sorted(manifest["files"]) == _checkpoint_files(tiny_hf_dir)
    assert manifest["files"][BIG]["sha256"] == hub.repos[REPO_ID].files[BIG].sha256

    with open(out / BIG, "r+b") as handle:
        handle.seek(1000)
        handle.write(b"\xff" * 16)
    before = hub.count(BIG)
    fetch_checkpoint(cfg, out, log=lambda *_: None)
    assert verify_manifest(out) == [] and hub.count(BIG) == before + 1
