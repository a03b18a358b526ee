"""One way to publish an output (omni_model.runtime.publish): the old output goes only after the new one is in place,
and a failed swap puts it back. download, convert and export all publish through it (issue 24, item 4)."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from omni_model.runtime.publish import fresh_staging, publish

PACKAGE = Path(__file__).resolve().parents[1] / "omni_model"


def _folder(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "weights.bin").write_text(text)
    return path


def test_publish_replaces_a_folder_and_leaves_nothing_beside_it(tmp_path):
    out = _folder(tmp_path / "out", "old")
    staging = fresh_staging(out)
    (staging / "weights.bin").write_text("new")
    publish(staging, out)
    assert (out / "weights.bin").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_swap_keeps_the_old_output(tmp_path, monkeypatch):
    """convert.checkpoint.publish removed the old checkpoint before renaming the new one in: a rename failing there
    (full disk, a permission, a killed job) left no checkpoint at all."""
    out = _folder(tmp_path / "out", "old")
    staging = _folder(tmp_path / "out.staging", "new")
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src) == staging:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        publish(staging, out)
    assert (out / "weights.bin").read_text() == "old"
    assert (staging / "weights.bin").read_text() == "new"


def test_publish_puts_a_folder_over_a_file_or_a_link(tmp_path):
    for kind in ("file", "link"):
        out = tmp_path / kind / "out"
        out.parent.mkdir()
        if kind == "file":
            out.write_text("old")
        else:
            out.symlink_to(_folder(tmp_path / kind / "target", "old"))
        publish(_folder(tmp_path / kind / "new", "new"), out)
        assert not out.is_symlink() and (out / "weights.bin").read_text() == "new"


def _private_imports(path: Path) -> list[str]:
    """`from X import _name` statements of a module naming another omni_model module's private helpers (upstream
    privates are the compat seam's business: registered and checked there, not here)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("omni_model")):
            found += [f"{node.module}.{alias.name}" for alias in node.names if alias.name.startswith("_")]
    return found


def test_the_stages_publish_through_one_module():
    """No module of the package imports another's private helpers (export took download's `_fresh_dir`/`_publish`),
    and no module but runtime/publish.py defines its own publish."""
    offenders, publishers = {}, []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        if _private_imports(path):
            offenders[rel] = _private_imports(path)
        tree = ast.parse(path.read_text())
        publishers += [f"{rel}:{node.name}" for node in tree.body
                       if isinstance(node, ast.FunctionDef) and node.name.lstrip("_") == "publish"]
    assert offenders == {}
    assert publishers == ["runtime/publish.py:publish"]
