"""The upstream seam (omni_model.compat): every registered patch / subclass / private use holds on the installed
stack, a changed upstream is detected, and an unverified megatron-core version stops the start-up."""

from __future__ import annotations

import logging

import pytest

from omni_model import compat
from omni_model.compat import registry
from omni_model.compat.registry import resolve

MCORE_SEAMS = sorted(seam.name for seam in compat.SEAMS if seam.package == "megatron-core")


@pytest.fixture(scope="module")
def patched():
    """Our patches in, as in a training process (CPU patches only without CUDA): each seam still sees upstream."""
    from omni_model.runtime import cpu_patches, multi_tensor

    cpu_patches.apply()
    multi_tensor.apply()


@pytest.mark.parametrize("seam", compat.SEAMS, ids=lambda seam: seam.name)
def test_every_seam_holds_on_the_installed_stack(seam, patched):
    if registry.installed_version(seam.package) is None:  # e.g. no Data-Juicer on the GPU machines
        pytest.skip(f"{seam.package} is not installed here")
    seam.verify()
    resolve(seam.ours)  # the catalogue points at our code that exists


def test_the_catalogue_covers_each_switch_and_package():
    """Each performance switch (PerfOptions field) has a seam; each package a seam depends on is version-checked
    by some stage start-up."""
    import dataclasses

    from omni_model.model.options import PerfOptions

    switches = {seam.switch for seam in compat.SEAMS if seam.switch}
    assert switches == {field.name for field in dataclasses.fields(PerfOptions)}
    gated = set(compat.TRAINING_PACKAGES) | set(compat.CONVERT_PACKAGES) | set(compat.DATA_PACKAGES)
    assert {seam.package for seam in compat.SEAMS} == gated == set(compat.VERIFIED)
    assert len(compat.BY_NAME) == len(compat.SEAMS)


def _installed_mcore_as(monkeypatch, version):
    real = registry.installed_version
    monkeypatch.setattr(registry, "installed_version",
                        lambda package: version if package == "megatron-core" else real(package))


def test_an_unknown_megatron_core_stops_init_parallel_naming_the_seams(monkeypatch):
    _installed_mcore_as(monkeypatch, "0.20.0")
    monkeypatch.delenv(compat.OVERRIDE_ENV, raising=False)
    from omni_model.runtime.parallel import init_parallel

    with pytest.raises(compat.UnverifiedUpstream) as info:
        init_parallel()  # refused before any process group or mcore state is made
    message = str(info.value)
    assert "init_parallel" in message and "megatron-core==0.20.0" in message and compat.OVERRIDE_ENV in message
    assert all(f"- {name} (" in message for name in MCORE_SEAMS), message
    assert "torch==" not in message  # the installed torch is a verified one
    assert len(MCORE_SEAMS) >= 15


def test_the_override_proceeds_with_a_warning(monkeypatch, caplog):
    _installed_mcore_as(monkeypatch, "0.20.0")
    monkeypatch.setenv(compat.OVERRIDE_ENV, "1")
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        compat.require_verified_upstream("megatron-core", where="test")
    assert "megatron-core==0.20.0" in caplog.text and "proceeding" in caplog.text


def test_verified_versions_match_with_a_build_suffix(monkeypatch):
    """torch reports '2.13.0+cpu' here and '2.11.0+cu130' on the GPU machines: both verified; 2.12 is not."""
    monkeypatch.delenv(compat.OVERRIDE_ENV, raising=False)
    for version, ok in (("2.13.0+cpu", True), ("2.11.0+cu130", True), ("2.12.1", False), ("2.110.0", False)):
        monkeypatch.setattr(registry, "installed_version", lambda package, v=version: v)
        assert (not registry.unverified(compat.SEAMS, ("torch",))) is ok, version


def test_a_changed_upstream_source_is_detected(monkeypatch):
    from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher

    seam = compat.BY_NAME["model.static_dispatch"]
    original = MoEAllGatherTokenDispatcher.dispatch_postprocess

    def dispatch_postprocess(self, hidden_states, probs):  # what an upgrade that reworks the method looks like
        return original(self, hidden_states, probs)

    monkeypatch.setattr(MoEAllGatherTokenDispatcher, "dispatch_postprocess", dispatch_postprocess)
    with pytest.raises(compat.UpstreamChanged, match="model.static_dispatch.*dispatch_postprocess"):
        seam.verify()


def test_a_changed_signature_is_detected(monkeypatch):
    import torch.distributed

    monkeypatch.setattr(torch.distributed, "all_to_all_single", lambda output, input, split_sizes=None: None)
    with pytest.raises(compat.UpstreamChanged, match="cpu.all_to_all_single"):
        compat.BY_NAME["cpu.all_to_all_single"].verify()


def test_a_removed_private_binding_is_detected(monkeypatch):
    from megatron.core.optimizer import clip_grads

    monkeypatch.delattr(clip_grads, "l2_norm_impl")
    with pytest.raises(compat.UpstreamChanged, match="l2_norm_impl is gone"):
        compat.BY_NAME["mt.bindings"].verify()
