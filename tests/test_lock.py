"""The locked environment: envs/requirements.lock (uv pip compile --generate-hashes, the command is in its header) is
what `make` installs; this venv, envs/requirements.txt and the conda env files must agree with it.

A real conda solve of envs/*.yaml is not tested: no conda solver installs from PyPI in usable form here
(conda-lock needs a conda/mamba/micromamba binary; py-rattler needs conda-forge's repodata, which this machine cannot
reach). What is tested is that every pip pin in those files is the lock's version.
"""

from __future__ import annotations

import re
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "envs" / "requirements.lock"
# installed but deliberately not in the lock: the installer itself and this project (pip install -e .)
NOT_LOCKED = {"pip", canonicalize_name(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"])}
# GPU-only packages of envs/gpu.yaml that cannot be installed (so not resolved) on the CPU machines
GPU_ONLY = {"transformer-engine", "flash-attn"}


def read_lock() -> dict[str, tuple[str, list[str]]]:
    """{canonical name: (version, [sha256 hashes])} of envs/requirements.lock."""
    entries, name = {}, None
    for line in LOCK.read_text().splitlines():
        pinned = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
        if pinned:
            name = canonicalize_name(pinned.group(1))
            entries[name] = (pinned.group(2), [])
        elif name and "--hash=sha256:" in line:
            entries[name][1].append(line.split("--hash=sha256:")[1].split()[0])
    return entries


def requirement_lines(path: Path) -> list[str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("-")]


def test_every_installed_package_is_the_locked_version():
    lock = read_lock()
    # the venv's site-packages only: sys.path may also hold setuptools/_vendor (added when setuptools is imported),
    # whose vendored copies are not installed packages
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions(path=site)}
    drift = {name: (version, lock[name][0]) for name, version in installed.items()
             if name in lock and version != lock[name][0]}
    unlocked = sorted(set(installed) - set(lock) - NOT_LOCKED)
    print(f"{len(installed)} installed distributions, {len(lock)} locked; drift {drift}; not in the lock {unlocked}")
    assert not drift, f"installed != envs/requirements.lock (installed, locked): {drift}; run `make venv`"
    assert not unlocked, f"installed but not in envs/requirements.lock: {unlocked}"


def test_lock_has_every_requirement_at_its_pin_with_hashes():
    lock = read_lock()
    requirements = [Requirement(line) for line in requirement_lines(ROOT / "envs" / "requirements.txt")]
    requirements += [Requirement(line) for line in requirement_lines(ROOT / "envs" / "lock.in")]
    missing = [str(r) for r in requirements if canonicalize_name(r.name) not in lock]
    assert not missing, f"in envs/requirements.txt / lock.in but not in the lock (regenerate it): {missing}"
    unmet = [f"{r} (locked {lock[canonicalize_name(r.name)][0]})" for r in requirements
             if not r.specifier.contains(lock[canonicalize_name(r.name)][0], prereleases=True)]
    assert not unmet, f"the lock does not satisfy: {unmet}; regenerate it with the command in its header"
    unhashed = sorted(name for name, (_, hashes) in lock.items() if not hashes)
    assert not unhashed, f"locked without a sha256 hash: {unhashed}"
    # PyPI's cp312 torch (its CUDA build) with only the CUDA libraries torch links: the meta-package naming them all
    # and the GPU-only Python bindings stay out (envs/lock-exclude.txt), (cuSOLVER, NVTX)
    assert lock["torch"][0] == "2.13.0"
    excluded = set(requirement_lines(ROOT / "envs" / "lock-exclude.txt"))
    assert excluded and not excluded & set(lock), f"excluded but locked: {sorted(excluded & set(lock))}"
    print(f"{len(requirements)} requirements, all locked; {sum(len(h) for _, h in lock.values())} hashes")


def conda_pip_requirements(path: Path) -> list[Requirement]:
    env = yaml.safe_load(path.read_text())
    pip = next(dep["pip"] for dep in env["dependencies"] if isinstance(dep, dict) and "pip" in dep)
    return [Requirement(line.split("#")[0].strip()) for line in pip if not line.startswith("-")]


def test_conda_env_files_pin_the_locked_versions():
    lock = read_lock()
    for name in ("pipeline.yaml", "gpu.yaml"):
        requirements = conda_pip_requirements(ROOT / "envs" / name)
        checked = [r for r in requirements if canonicalize_name(r.name) not in GPU_ONLY]
        unpinned = [str(r) for r in checked if not str(r.specifier).startswith("==")]
        assert not unpinned, f"envs/{name}: not pinned: {unpinned}"
        differ = {r.name: (str(r.specifier), lock[canonicalize_name(r.name)][0]) for r in checked
                  if canonicalize_name(r.name) != "torch" and str(r.specifier) != f"=={lock[canonicalize_name(r.name)][0]}"}
        assert not differ, f"envs/{name} pins differ from envs/requirements.lock (file, lock): {differ}"
        print(f"envs/{name}: {len(checked)} pip pins == the lock")


def test_device_wheels_pin_the_locked_versions():
    """envs/device-wheels.txt (what a GPU machine without a registry is given) names the lock's versions."""
    lock = read_lock()
    pins = [Requirement(line) for line in requirement_lines(ROOT / "envs" / "device-wheels.txt")]
    unpinned = [str(r) for r in pins if not str(r.specifier).startswith("==")]
    assert not unpinned, f"envs/device-wheels.txt: not pinned: {unpinned}"
    differ = {r.name: (str(r.specifier), lock.get(canonicalize_name(r.name), ("not locked",))[0]) for r in pins
              if str(r.specifier) != f"=={lock.get(canonicalize_name(r.name), ('',))[0]}"}
    assert not differ, f"envs/device-wheels.txt pins differ from envs/requirements.lock (file, lock): {differ}"
    assert {"megatron-core", "transformers", "megatron-energon"} <= {canonicalize_name(r.name) for r in pins}
    print(f"envs/device-wheels.txt: {len(pins)} pins == the lock")
