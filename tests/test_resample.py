"""Audio resampling equals the release's: ``librosa.resample(res_type="soxr_hq")`` (what ``librosa.load(sr=...)``
does in qwen-omni-utils) is the independent reference; ours calls soxr itself so that encoding media never imports
librosa (and with it numba + llvmlite)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from omni_model.data.media import resample, resampled_length, to_mono

RATES = [(44100, 16000), (22050, 16000), (8000, 16000), (48000, 24000), (16000, 24000), (44100, 24000), (11025, 16000)]


@pytest.mark.parametrize("rate,target", RATES)
@pytest.mark.parametrize("length", [1, 7, 441, 12345, 66150])
def test_resample_is_librosa_soxr_hq_bit_for_bit(rate, target, length):
    import librosa

    samples = np.random.default_rng(length + rate).standard_normal(length).astype(np.float32) * 0.3
    ours = resample(samples, rate, target)
    reference = librosa.resample(samples, orig_sr=rate, target_sr=target, res_type="soxr_hq")
    assert ours.dtype == reference.dtype == np.float32
    assert ours.shape == reference.shape == (resampled_length(length, rate, target),)
    np.testing.assert_array_equal(ours, reference)


def test_stereo_mix_then_resample_is_librosa_load():
    """librosa.load(mono=True, sr=16000) on a stereo file: mean of the channels, then soxr_hq."""
    import io

    import librosa
    import soundfile as sf

    rng = np.random.default_rng(0)
    stereo = (rng.standard_normal((22050, 2)) * 0.2).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, stereo, 22050, format="WAV", subtype="FLOAT")
    reference, rate = librosa.load(io.BytesIO(buffer.getvalue()), sr=16000)
    assert rate == 16000
    np.testing.assert_array_equal(to_mono(stereo, 22050, 16000), reference)


def test_encoding_audio_does_not_import_librosa_or_numba():
    code = ("import sys, numpy as np\n"
            "from omni_model.data.media import to_mono\n"
            "to_mono(np.zeros((4410, 2), np.float32), 44100, 16000)\n"
            "print(sorted(m for m in ('librosa', 'numba', 'llvmlite') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
