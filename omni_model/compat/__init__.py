"""One seam between omni_model and the upstream code it patches, subclasses or reads privately.

Every such place is a `Seam` in `seams.SEAMS` (upstream location, our code, reason, versions verified on, and a
fingerprint or behaviour check that fails when upstream changes underneath it). At start-up the stages call
`require_verified_upstream(...)` for the packages they touch: an installed version that the seams were not verified on
stops the stage with the list of seams to re-verify, unless OMNI_ALLOW_UNVERIFIED_UPSTREAM=1 (then a warning).

    python -m omni_model.compat                 # check every seam against the installed code
    python -m omni_model.compat --fingerprints  # print the fingerprints to record after re-verifying
"""

from __future__ import annotations

from .registry import OVERRIDE_ENV, Seam, UnverifiedUpstream, UpstreamChanged, installed_version
from .registry import require_verified as _require_verified
from .seams import BY_NAME, SEAMS, VERIFIED

# the packages each start-up checks (init_parallel: training, whose loader is Energon's, and convert)
TRAINING_PACKAGES = ("megatron-core", "torch", "megatron-energon")
CONVERT_PACKAGES = ("megatron-core", "torch", "transformers")
DATA_PACKAGES = ("py-data-juicer", "megatron-energon")

__all__ = ["BY_NAME", "OVERRIDE_ENV", "SEAMS", "Seam", "UnverifiedUpstream", "UpstreamChanged", "VERIFIED",
           "installed_versions", "require_verified_upstream"]


def require_verified_upstream(*packages: str, where: str = "omni_model") -> None:
    """Stop (UnverifiedUpstream) when an installed version of `packages` is not one the seams were verified on."""
    _require_verified(SEAMS, packages, where)


def installed_versions() -> dict:
    """{package: installed version or None} for every package a seam depends on (for reports: parity.json)."""
    return {package: installed_version(package) for package in VERIFIED}
