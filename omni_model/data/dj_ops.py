"""Data-Juicer operators registered by omni-pipeline (importing this module registers them).

``omni_audio_duration_filter``: the same contract as Data-Juicer's ``audio_duration_filter`` (min/max seconds,
any/all, stats key ``audio_duration``), but it reads durations from the file header with soundfile. The built-in
op decodes through ``datasets.Audio`` -> torchcodec and pip-installs resampy/samplerate/torchcodec at run time;
torchcodec needs system FFmpeg libraries and a torch-matched build that this stack (torch 2.13 CPU) does not have.

``omni_video_duration_filter``: the contract of ``video_duration_filter`` with the duration the encoder plans frames
with (media.plan_video); the built-in op fails on streams that state no duration (WebM/Matroska, MPEG-1).

``omni_document_media_deduplicator`` / ``omni_minhash_media_deduplicator``: exact / near duplicates decided on the
text AND the media content (see the comment above them).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import defaultdict

import numpy as np
from data_juicer.ops.base_op import OPERATORS, Deduplicator, Filter
from data_juicer.ops.deduplicator.document_minhash_deduplicator import DocumentMinhashDeduplicator
from data_juicer.utils.constant import Fields, HashKeys, StatsKeys

from .digest import FINGERPRINT_KEY, same_media, sample_fingerprint
from .media import error_text

AUDIO_OP = "omni_audio_duration_filter"
VIDEO_OP = "omni_video_duration_filter"


def _audio_duration(path: str) -> float:
    import soundfile as sf

    info = sf.info(path)
    return info.frames / float(info.samplerate)


def _video_duration(path: str) -> float:
    """The video stream's duration as the encoder plans frames with it (media.plan_video: from the packets when the
    stream states none)."""
    from pathlib import Path

    from .media import MediaConfig, plan_video

    return plan_video(Path(path).read_bytes(), MediaConfig()).duration


class _MediaDurationFilter(Filter):
    """Data-Juicer's audio_/video_duration_filter contract (min/max seconds, any/all, stats key ``stats_key``) with
    the duration read by ``duration`` from each path of the sample's list named by the op's ``media_key_attr``."""

    media_key_attr: str  # "audio_key" / "video_key": the op attribute naming the sample's media list
    stats_key: str

    @staticmethod
    def duration(path: str) -> float:
        raise NotImplementedError

    def __init__(self, min_duration: float = 0, max_duration: float = sys.maxsize, any_or_all: str = "any",
                 *args, **kwargs):
        super().__init__(*args, **kwargs)
        if any_or_all not in ("any", "all"):
            raise ValueError(f"any_or_all must be 'any' or 'all', got {any_or_all!r}")
        self.min_duration = min_duration
        self.max_duration = max_duration
        self.any = any_or_all == "any"

    def compute_stats_single(self, sample, context=False):
        if self.stats_key in sample[Fields.stats]:
            return sample
        paths = sample.get(getattr(self, self.media_key_attr)) or []
        sample[Fields.stats][self.stats_key] = [self.duration(p) for p in paths] if paths else \
            np.array([], dtype=np.float64)
        return sample

    def process_single(self, sample):
        durations = sample[Fields.stats][self.stats_key]
        keep = [self.get_keep_boolean(d, self.min_duration, self.max_duration) for d in durations]
        if not keep:
            return True
        return any(keep) if self.any else all(keep)


if AUDIO_OP not in OPERATORS.modules:

    @OPERATORS.register_module(AUDIO_OP)
    class OmniAudioDurationFilter(_MediaDurationFilter):
        """Keep samples whose audio durations (seconds, from the header) are within [min_duration, max_duration]."""

        media_key_attr, stats_key, duration = "audio_key", StatsKeys.audio_duration, staticmethod(_audio_duration)


if VIDEO_OP not in OPERATORS.modules:

    @OPERATORS.register_module(VIDEO_OP)
    class OmniVideoDurationFilter(_MediaDurationFilter):
        """Keep samples whose video durations (seconds, the video stream's as the encoder plans with it) are within
        [min_duration, max_duration]. Data-Juicer's video_duration_filter multiplies the stream's duration by its
        time base and fails on every stream without one (Matroska/WebM written by FFmpeg, MPEG-1 elementary)."""

        media_key_attr, stats_key, duration = "video_key", StatsKeys.video_duration, staticmethod(_video_duration)


# ------------------------------------------------------------------------------------------------ deduplicators
# Data-Juicer's own deduplicators each decide on ONE modality: document_deduplicator / the minhash op on the text only,
# image_deduplicator / video_deduplicator on images / video packets (optionally + text), none on audio. Chained, the
# text op drops "Describe the image." over thousands of different images, and the image op drops two samples with the
# same picture and text but different audio. A sample is a duplicate only when its text AND all its media match, so
# the two ops below decide on both at once: the text as Data-Juicer hashes it (the minhash op's bands for near
# duplicates) plus a content fingerprint of every medium (omni_model.data.digest: decoded content, so a re-encoded
# copy is the same medium). Digits and punctuation are kept: "clip 3" and "clip 4" are different prompts.
TEXT_HASH_KEY = "omni_text_hash"
EXACT_OP = "omni_document_media_deduplicator"
NEAR_OP = "omni_minhash_media_deduplicator"


def _add_fingerprint(op, sample) -> None:
    """The fingerprint validation computed (run_stage), else computed here (MediaError on undecodable media)."""
    if not sample.get(FINGERPRINT_KEY):
        lists = {"images": sample.get(op.image_key) or [], "audios": sample.get(op.audio_key) or [],
                 "videos": sample.get(op.video_key) or []}
        sample[FINGERPRINT_KEY] = json.dumps(sample_fingerprint(lists))


class _UnionFind:
    """Union-find whose root is always the smallest index: the first occurrence is the sample kept."""

    def __init__(self):
        self.parent: dict = {}

    def find(self, x: int) -> int:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while x != root:
            self.parent[x], x = root, self.parent.get(x, x)
        return root

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            self.parent[max(rx, ry)] = min(rx, ry)


def _union_same_media(candidates: list[int], fingerprints: list[dict], union: _UnionFind) -> None:
    """Within one group of text-equal (or text-similar) samples, join those whose media are the same."""
    kept: list[int] = []
    for index in sorted(candidates):
        match = next((k for k in kept if same_media(fingerprints[k], fingerprints[index])), None)
        if match is None:
            kept.append(index)
        else:
            union.union(index, match)


def _keep_roots(dataset, union: _UnionFind):
    """(dataset of cluster roots, {root: [root sample, its duplicates...]}) as Data-Juicer deduplicators return."""
    clusters: dict = {}
    for index in sorted(union.parent):
        root = union.find(index)
        if root != index:
            clusters.setdefault(root, [dataset[root]]).append(dataset[index])
    keep = [i for i in range(len(dataset)) if union.find(i) == i]
    return dataset.select(keep), clusters


if EXACT_OP not in OPERATORS.modules:

    @OPERATORS.register_module(EXACT_OP)
    class OmniDocumentMediaDeduplicator(Deduplicator):
        """Exact duplicates: equal text (md5, optionally lowercased, whitespace runs collapsed; digits and
        punctuation kept) AND the same media content (digest.same_media). The first occurrence is kept; each
        duplicate is reported with the sample it duplicates."""

        def __init__(self, lowercase: bool = False, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.lowercase = lowercase

        def compute_hash(self, sample, context=False):
            text = " ".join(sample[self.text_key].split())
            sample[TEXT_HASH_KEY] = hashlib.md5((text.lower() if self.lowercase else text).encode()).hexdigest()
            _add_fingerprint(self, sample)
            return sample

        def process(self, dataset, show_num=0):
            fingerprints = [json.loads(f) for f in dataset[FINGERPRINT_KEY]]
            groups: dict = {}
            for index, (text_hash, fp) in enumerate(zip(dataset[TEXT_HASH_KEY], fingerprints)):
                groups.setdefault((text_hash, fp["key"]), []).append(index)
            union = _UnionFind()
            for members in groups.values():
                if len(members) > 1:
                    _union_same_media(members, fingerprints, union)
            return _keep_roots(dataset, union)


if NEAR_OP not in OPERATORS.modules:

    @OPERATORS.register_module(NEAR_OP)
    class OmniMinhashMediaDeduplicator(DocumentMinhashDeduplicator):
        """Near duplicates: Data-Juicer's MinHash LSH on the text (same parameters, same bands) AND the same media
        content: samples sharing a band are joined only when their media are the same.

        A text with fewer tokens than ``window_size`` has no shingle, and Data-Juicer gives every such text the same
        signature (all bands equal), so "Capital of France?" / "Paris." and "Is it dark?" / "No." were near
        duplicates of each other. Here such a text's bands are a hash of its whole token sequence instead (it is its
        own single shingle): short texts join only when their words are the same."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._no_shingle_bands = super().compute_hash({self.text_key: ""})[HashKeys.minhash]

        def compute_hash(self, sample):
            sample = super().compute_hash(sample)
            if sample[HashKeys.minhash] == self._no_shingle_bands:
                text = sample[self.text_key].lower() if self.lowercase else sample[self.text_key]
                if self.ignore_pattern:  # as Data-Juicer prepares the text before tokenising it
                    text = self.ignore_pattern.sub("", text)
                whole = hashlib.sha1(" ".join(text.split()).encode()).digest()
                sample[HashKeys.minhash] = [b"whole-text:" + whole] * len(self._no_shingle_bands)
            _add_fingerprint(self, sample)
            return sample

        def process(self, dataset, show_num=0):
            if len(dataset) <= 1:
                return dataset, {}
            bands_per_sample = dataset[HashKeys.minhash]
            fingerprints = [json.loads(f) for f in dataset[FINGERPRINT_KEY]]
            dataset = dataset.remove_columns([HashKeys.minhash])  # bytes do not export
            tables = [defaultdict(list) for _ in range(self.num_bands)]
            for index, bands in enumerate(bands_per_sample):
                for band, table in zip(bands, tables):
                    table[band].append(index)
            union = _UnionFind()
            for table in tables:
                for members in table.values():
                    if len(members) > 1:
                        _union_same_media(members, fingerprints, union)
            return _keep_roots(dataset, union)


# ------------------------------------------------------------------------------------------------ one sample alone
def sample_error(op, row: dict) -> str | None:
    """The op's per-sample work (hash, stats + keep decision, or mapping) on one row alone: ``"Type: message"`` of
    what it raises, None when it passes. Called as Data-Juicer calls it, with a batch of one row."""
    batch = {key: [value] for key, value in row.items()}
    if batch.get(Fields.stats, [None])[0] is None:
        batch[Fields.stats] = [{}]
    try:
        if hasattr(op, "compute_hash"):
            op.compute_hash(batch)
        elif hasattr(op, "compute_stats"):
            op.process(op.compute_stats(batch))
        else:
            op.process(batch)
    except Exception as exc:  # any error of the op on this sample is this sample's drop reason
        return error_text(exc)
    return None
