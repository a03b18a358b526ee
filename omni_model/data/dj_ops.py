"""Data-Juicer operators registered by omni-pipeline (importing this module registers them).

``omni_audio_duration_filter``: the same contract as Data-Juicer's ``audio_duration_filter`` (min/max seconds,
any/all, stats key ``audio_duration``), but it reads durations from the file header with soundfile. The built-in
op decodes through ``datasets.Audio`` -> torchcodec and pip-installs resampy/samplerate/torchcodec at run time;
torchcodec needs system FFmpeg libraries and a torch-matched build that this stack (torch 2.13 CPU) does not have.
"""

from __future__ import annotations

import sys

import numpy as np
from data_juicer.ops.base_op import OPERATORS, Filter
from data_juicer.utils.constant import Fields, StatsKeys

AUDIO_OP = "omni_audio_duration_filter"


def _duration(path: str) -> float:
    import soundfile as sf

    info = sf.info(path)
    return info.frames / float(info.samplerate)


if AUDIO_OP not in OPERATORS.modules:

    @OPERATORS.register_module(AUDIO_OP)
    class OmniAudioDurationFilter(Filter):
        """Keep samples whose audio durations (seconds, from the header) are within [min_duration, max_duration]."""

        def __init__(self, min_duration: float = 0, max_duration: float = sys.maxsize, any_or_all: str = "any",
                     *args, **kwargs):
            super().__init__(*args, **kwargs)
            if any_or_all not in ("any", "all"):
                raise ValueError(f"any_or_all must be 'any' or 'all', got {any_or_all!r}")
            self.min_duration = min_duration
            self.max_duration = max_duration
            self.any = any_or_all == "any"

        def compute_stats_single(self, sample, context=False):
            if StatsKeys.audio_duration in sample[Fields.stats]:
                return sample
            paths = sample.get(self.audio_key) or []
            sample[Fields.stats][StatsKeys.audio_duration] = [_duration(p) for p in paths] if paths else \
                np.array([], dtype=np.float64)
            return sample

        def process_single(self, sample):
            durations = sample[Fields.stats][StatsKeys.audio_duration]
            keep = [self.get_keep_boolean(d, self.min_duration, self.max_duration) for d in durations]
            if not keep:
                return True
            return any(keep) if self.any else all(keep)
