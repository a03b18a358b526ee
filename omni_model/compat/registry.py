"""The seam's machinery: `Seam` (one place where we depend on an upstream internal), its upstream check, and the
start-up version gate. Imports nothing but the standard library: the upstream objects are named by strings and
resolved only when a seam is checked."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import inspect
import logging
import os
import textwrap
from typing import Callable, Optional, Union

log = logging.getLogger(__name__)

OVERRIDE_ENV = "OMNI_ALLOW_UNVERIFIED_UPSTREAM"

# How a seam's upstream is fingerprinted:
#   "source":    sha256 of each target's dedented source (a private internal we patch, copy or rely on in detail)
#   "signature": each target's inspect.signature (a function we call by keyword or a hook we override)
#   "exists":    each target resolves (a public or private name we read or replace wholesale)
#   a callable:  a behaviour check `f() -> None` raising AssertionError with what changed
Check = Union[str, Callable[[], None]]


@dataclasses.dataclass(frozen=True)
class Seam:
    name: str  # short key, e.g. "mcore.router.gating"
    package: str  # the distribution whose code this depends on (importlib.metadata name)
    upstream: tuple[str, ...]  # "module:qualname" of each upstream object depended on
    ours: str  # "module:qualname" of our code that patches / subclasses / reads it
    kind: str  # patch | subclass | private | call | switch | source-parse
    reason: str
    verified_on: tuple[str, ...]  # versions of `package` this seam was checked on
    check: Check = "source"
    fingerprint: Optional[str] = None  # expected "source"/"signature" fingerprint on the verified versions
    switch: Optional[str] = None  # the PerfOptions field that turns our side off (back to upstream's own code)

    def current_fingerprint(self) -> Optional[str]:
        """This seam's fingerprint on the installed upstream (None for exists/behaviour checks)."""
        objects = [resolve(target) for target in self.upstream]
        if self.check == "source":
            digest = hashlib.sha256()
            for obj in objects:
                digest.update(textwrap.dedent(inspect.getsource(obj)).encode())
            return digest.hexdigest()[:16]
        if self.check == "signature":
            return "; ".join(_bare_signature(obj) for obj in objects)
        return None

    def verify(self) -> None:
        """Raise UpstreamChanged when the installed upstream is not what this seam was written against."""
        try:
            if callable(self.check):
                for target in self.upstream:
                    resolve(target)
                self.check()
                return
            found = self.current_fingerprint()
        except (ImportError, AttributeError, AssertionError, OSError, TypeError) as exc:
            raise UpstreamChanged(self, f"{type(exc).__name__}: {exc}") from exc
        if found != self.fingerprint:
            raise UpstreamChanged(self, f"{self.check} fingerprint {found!r}, recorded {self.fingerprint!r}")


def _bare_signature(obj) -> str:
    """The parameter names and kinds of `obj` (defaults and annotations left out: their reprs are not stable)."""
    signature = inspect.signature(obj)
    bare = [p.replace(default=inspect.Parameter.empty, annotation=inspect.Parameter.empty)
            for p in signature.parameters.values()]
    return str(signature.replace(parameters=bare, return_annotation=inspect.Signature.empty))


class UpstreamChanged(AssertionError):
    def __init__(self, seam: Seam, what: str):
        self.seam = seam
        super().__init__(f"{seam.name}: {', '.join(seam.upstream)} changed under {seam.ours} ({what}); "
                         f"re-verify: {seam.reason}")


class UnverifiedUpstream(RuntimeError):
    """An installed package version that the seams touching it were not checked on."""


def replace_upstream(owner, name: str, new) -> None:
    """`owner.name = new`, remembering upstream's object on `new` so that the seam's check still fingerprints
    upstream's code once the patch is in (resolve() follows `__upstream__`)."""
    new.__upstream__ = getattr(owner, name)
    setattr(owner, name, new)


def resolve(target: str):
    """'package.module:Qual.name' -> upstream's object (imports the module; behind a patch, the patched original)."""
    module_name, _, qualname = target.partition(":")
    obj = importlib.import_module(module_name)
    for part in filter(None, qualname.split(".")):
        obj = inspect.getattr_static(obj, part) if inspect.isclass(obj) else getattr(obj, part)
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        elif isinstance(obj, property):
            obj = obj.fget
        while hasattr(obj, "__upstream__"):
            obj = obj.__upstream__
    return obj


def installed_version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_matches(installed: str, verified: str) -> bool:
    """'2.11.0+cu130' matches '2.11' and '2.11.0'; the local part (+cpu, +cu130) is a build, not a version."""
    release = installed.split("+")[0]
    return release == verified or release.startswith(verified + ".")


def unverified(seams, packages) -> dict[str, list[Seam]]:
    """{'package==installed': the seams not verified on it} for the installed versions of `packages`."""
    found: dict[str, list[Seam]] = {}
    for seam in seams:
        if seam.package not in packages:
            continue
        version = installed_version(seam.package)
        if version is not None and not any(version_matches(version, v) for v in seam.verified_on):
            found.setdefault(f"{seam.package}=={version}", []).append(seam)
    return found


def require_verified(seams, packages, where: str) -> None:
    """The start-up gate: stop when an installed version of `packages` was not checked against the seams that
    depend on it, naming them; with OMNI_ALLOW_UNVERIFIED_UPSTREAM=1 log a warning and go on."""
    found = unverified(seams, packages)
    if not found:
        return
    lines = [f"  {version}: re-verify {len(listed)} seam(s):\n" +
             "\n".join(f"    - {s.name} ({s.kind} of {', '.join(s.upstream)} in {s.ours}; checked on "
                       f"{', '.join(s.verified_on)})" for s in listed)
             for version, listed in sorted(found.items())]
    message = (f"{where}: installed upstream versions that omni_model's seams were not verified on:\n"
               + "\n".join(lines) + "\nRun `python -m omni_model.compat` to check each seam against the installed "
               f"code (omni_model/compat/README.md says how to re-verify); set {OVERRIDE_ENV}=1 to proceed anyway.")
    if os.environ.get(OVERRIDE_ENV, "") not in ("", "0"):
        log.warning("%s\n(%s is set: proceeding)", message, OVERRIDE_ENV)
        return
    raise UnverifiedUpstream(message)
