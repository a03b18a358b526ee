"""Conversation + media bytes -> :class:`EncodedSample` (tokens, labels, MRoPE positions, media tensors).

Two inputs, one output: ``encode`` takes the original media files (decodes images, resamples audio, decodes video:
the shards stage, tests, the parity probe), ``encode_canonical`` takes the canonical members the shards stage wrote
from that decode (``canonical_members``; media.MEDIA_FORMAT: 16 kHz waveforms, sampled frames as PNG, original
images) and gives the same tensors bit for bit with soundfile and PIL only (the training loader). Used by the Energon
task encoder, the shards stage and the benchmark. No Energon or Snakemake here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..configs import thinker_config_of
from .batch import EncodedSample
from .formats import LIST_KEY, media_tag_order
from .media import (
    AUDIO_SR,
    MEDIA_FORMAT,
    MediaError,
    MediaConfig,
    Video,
    audio_feature_length,
    audio_features,
    audio_output_lengths,
    audio_samples_16k,
    check_audio_length,
    decode_image,
    decode_video,
    image_grid,
    image_size,
    load_audio_16k,
    plan_video,
    preprocess_image,
    preprocess_video,
    read_audio_16k,
    read_frames_png,
    video_frame_size,
    write_audio_16k,
    write_frames_png,
)
from .rope_index import interleave_audio_video_tokens, rope_index
from .speech import read_codes, speech_turns
from .template import ChatTokenizer


class OverLongSample(ValueError):
    """Token count after pad expansion exceeds max_seq_len."""


class ShardFormatError(ValueError):
    """A shard sample that does not hold canonical media of this MEDIA_FORMAT (shards of an older pipeline)."""


@dataclass
class Decoded:
    """Decoded media of one conversation, in list order per kind."""

    images: list  # RGB uint8 arrays
    audios: list  # 16 kHz mono float32
    videos: list  # media.Video


@dataclass
class MediaShapes:
    """What the token count needs, per kind in list order: image (height, width), audio length in 16 kHz samples,
    video (frames, frame height, frame width, 16 kHz samples of its audio track or None). ``exact`` is False when a
    video's audio track length is a header estimate (compressed audio streams do not state their exact sample count)."""

    images: list
    audios: list
    videos: list
    exact: bool = True


class OmniEncoder:
    """Encodes canonical records (formats.py) whose media are given as bytes, keyed by (kind, index)."""

    def __init__(self, hf_dir: Path, max_seq_len: int = 4096, use_audio_in_video: bool = False, **media_overrides):
        hf_dir = Path(hf_dir)
        self.media = MediaConfig.from_hf_dir(hf_dir, **media_overrides)
        self.chat = ChatTokenizer(hf_dir)
        self.max_seq_len = int(max_seq_len)
        self.use_audio_in_video = bool(use_audio_in_video)
        self.tokenizer_digest = tokenizer_digest(hf_dir)
        thinker = thinker_config_of(hf_dir)
        self.position_id_per_seconds = thinker.get("position_id_per_seconds", 13)
        self.pad_id = self.chat.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.chat.tokenizer.convert_tokens_to_ids("<|endoftext|>")

    def settings(self) -> dict:
        """Everything that decides which samples fit and what their tokens are: recorded with the shards
        (report.json, .nv-meta/encoder_settings.json) and checked by training (shards.check_shard_settings)."""
        m = self.media
        return {
            "max_seq_len": self.max_seq_len, "use_audio_in_video": self.use_audio_in_video,
            "image_min_pixels": m.min_pixels, "image_max_pixels": m.max_pixels, "patch_size": m.patch_size,
            "merge_size": m.merge_size, "temporal_patch_size": m.temporal_patch_size, "video_fps": m.video_fps,
            "video_min_frames": m.video_min_frames, "video_max_frames": m.video_max_frames,
            "video_min_pixels": m.video_min_pixels, "video_max_pixels": m.video_max_pixels, "n_window": m.n_window,
            "tokenizer_digest": self.tokenizer_digest, "media_format": MEDIA_FORMAT,
        }

    # ------------------------------------------------------------------ decoding
    def decode(self, record: dict, media: dict, names: dict | None = None) -> Decoded:
        """Full decode of every medium; a failure raises media.MediaError naming the medium and the reason."""
        def run(kind, index, fn, *args, **kwargs):
            try:
                return fn(media[(kind, index)], *args, **kwargs)
            except MediaError as exc:
                name = (names or {}).get((kind, index), f"{kind}{index}")
                source = record.get(LIST_KEY[kind], [None] * (index + 1))[index]
                raise MediaError(f"{name} ({Path(source).name if source else '?'}): {exc}") from None

        images = [run("image", i, decode_image) for i in range(len(record.get("images", [])))]
        audios = [run("audio", i, load_audio_16k) for i in range(len(record.get("audios", [])))]
        videos = [run("video", i, decode_video, self.media, with_audio=self.use_audio_in_video)
                  for i in range(len(record.get("videos", [])))]
        return Decoded(images, audios, videos)

    # ------------------------------------------------------------------ canonical media
    def canonical_members(self, record: dict, media: dict, decoded: Decoded) -> tuple[dict, dict]:
        """What the shards store for one record: (member name -> bytes, record fields naming them). Images keep
        their original bytes, audios their 16 kHz waveform (media.write_audio_16k), videos their sampled frames (one
        PNG) + the track's waveform when audio-in-video decoded one; frame times and seconds per grid go into
        ``media_meta``."""
        members, lists = {}, {"images": [], "audios": [], "videos": []}
        meta = {"audios": [], "videos": []}
        for index, path in enumerate(record.get("images", [])):
            name = f"image{index}.{Path(path).suffix.lower().lstrip('.') or 'bin'}"
            members[name] = media[("image", index)]
            lists["images"].append(name)
        for index, wave in enumerate(decoded.audios):
            data, ext = write_audio_16k(wave)
            members[f"audio{index}.{ext}"] = data
            lists["audios"].append(f"audio{index}.{ext}")
            meta["audios"].append({"samples": len(wave)})
        for index, video in enumerate(decoded.videos):
            name = f"video{index}.png"
            members[name] = write_frames_png(video.frames)
            lists["videos"].append(name)
            entry = {"frames": list(video.frames.shape[:3]), "times": [float(t) for t in video.times],
                     "second_per_grid": float(video.second_per_grid), "duration": float(video.duration), "audio": None}
            if video.audio is not None:
                data, ext = write_audio_16k(video.audio)
                entry["audio"], entry["audio_samples"] = f"video{index}.{ext}", len(video.audio)
                members[entry["audio"]] = data
            meta["videos"].append(entry)
        return members, {**lists, "media_format": MEDIA_FORMAT, "media_meta": meta}

    def _canonical_meta(self, record: dict) -> dict:
        found = record.get("media_format")
        if found != MEDIA_FORMAT:
            raise ShardFormatError(
                f"sample {record.get('id')}: its shards hold media format {found or 'original files (pre-canonical)'}"
                f", this loader reads {MEDIA_FORMAT}: rerun the shards stage")
        return record["media_meta"]

    def canonical_shapes(self, record: dict, members: dict) -> MediaShapes:
        """Exact media shapes of canonical members (image headers + the recorded meta; nothing decoded)."""
        meta = self._canonical_meta(record)
        images = [self._named(record, "image", i, image_size, members[name]) for i, name in enumerate(record["images"])]
        videos = [(*entry["frames"], entry.get("audio_samples") if self.use_audio_in_video else None)
                  for entry in meta["videos"]]
        return MediaShapes(images, [entry["samples"] for entry in meta["audios"]], videos)

    def load_canonical(self, record: dict, members: dict) -> Decoded:
        """Canonical members -> the Decoded media ``decode`` gave when they were written (soundfile + PIL only)."""
        meta = self._canonical_meta(record)
        images = [self._named(record, "image", i, decode_image, members[name])
                  for i, name in enumerate(record["images"])]
        audios = [self._named(record, "audio", i, read_audio_16k, members[name])
                  for i, name in enumerate(record["audios"])]
        videos = []
        for i, (name, entry) in enumerate(zip(record["videos"], meta["videos"])):
            frames = self._named(record, "video", i, read_frames_png, members[name], entry["frames"][0])
            audio = None
            if self.use_audio_in_video and entry["audio"]:
                audio = self._named(record, "video", i, read_audio_16k, members[entry["audio"]])
            videos.append(Video(frames=frames, second_per_grid=entry["second_per_grid"], duration=entry["duration"],
                                audio=audio, times=np.asarray(entry["times"])))
        return Decoded(images, audios, videos)

    # ------------------------------------------------------------------ shapes and counting
    def _named(self, record: dict, kind: str, index: int, fn, data, *args, **kwargs):
        try:
            return fn(data, *args, **kwargs)
        except MediaError as exc:
            lists = record["source"] if isinstance(record.get("source"), dict) else record  # shard json: originals
            source = lists.get(LIST_KEY[kind], [None] * (index + 1))[index]
            raise MediaError(f"{kind}{index} ({Path(source).name if source else '?'}): {exc}") from None

    def probe(self, record: dict, media: dict) -> MediaShapes:
        """Media shapes from the file headers alone (no pixel, sample or mel work)."""
        images = [self._named(record, "image", i, image_size, media[("image", i)])
                  for i in range(len(record.get("images", [])))]
        audios = [self._named(record, "audio", i, audio_samples_16k, media[("audio", i)])
                  for i in range(len(record.get("audios", [])))]
        videos, exact = [], True
        for i in range(len(record.get("videos", []))):
            plan = self._named(record, "video", i, plan_video, media[("video", i)], self.media)
            track = None
            if self.use_audio_in_video and plan.audio_duration:
                track, exact = int(round(plan.audio_duration * AUDIO_SR)), False
            videos.append((plan.n_frames, *plan.frame_size, track))
        return MediaShapes(images, audios, videos, exact)

    def shapes_of(self, decoded: Decoded) -> MediaShapes:
        """Exact media shapes of decoded media."""
        return MediaShapes(
            [rgb.shape[:2] for rgb in decoded.images], [len(wave) for wave in decoded.audios],
            [(*video.frames.shape[:3], None if video.audio is None else len(video.audio)) for video in decoded.videos])

    def _video_grid(self, n_frames: int, height: int, width: int) -> tuple[int, int, int]:
        height, width = video_frame_size(height, width, n_frames, self.media)
        p = self.media.patch_size
        return n_frames // self.media.temporal_patch_size, height // p, width // p

    def count_tokens(self, record: dict, shapes) -> int:
        """Sequence length after pad expansion, from media shapes (``MediaShapes``, or ``Decoded`` media)."""
        if isinstance(shapes, Decoded):
            shapes = self.shapes_of(shapes)
        ids, _ = self.chat.tokenize(record["messages"])
        total = len(ids)
        merge2, n_window = self.media.merge_size**2, self.media.n_window
        for height, width in shapes.images:
            total += int(np.prod(image_grid(height, width, self.media))) // merge2 - 1
        for n_samples in shapes.audios:
            total += int(audio_output_lengths(audio_feature_length(n_samples), n_window)) - 1
        for n_frames, height, width, track in shapes.videos:
            total += int(np.prod(self._video_grid(n_frames, height, width))) // merge2 - 1
            if self.use_audio_in_video and track is not None:
                total += int(audio_output_lengths(audio_feature_length(track), n_window)) + 2
        return total

    def check_length(self, record: dict, media: dict) -> int:
        """Token count from the headers; raises OverLongSample before any decoding when it is exact and too long."""
        return self._check_length(record, self.probe(record, media))

    def _check_length(self, record: dict, shapes: MediaShapes) -> int:
        """Token count; raises MediaError for a clip too short to encode (media.min_audio_samples), OverLongSample
        when the count is exact and too long. Both from the shapes alone, before any decoding."""
        for index, n_samples in enumerate(shapes.audios):
            self._named(record, "audio", index, check_audio_length, n_samples, self.media)
        for index, (*_, track) in enumerate(shapes.videos):
            if self.use_audio_in_video and track is not None:
                self._named(record, "video", index, check_audio_length, track, self.media)
        n_tokens = self.count_tokens(record, shapes)
        if shapes.exact and n_tokens > self.max_seq_len:
            raise OverLongSample(f"{n_tokens} tokens after media expansion > max_seq_len {self.max_seq_len}")
        return n_tokens

    # ------------------------------------------------------------------ encoding
    def encode(self, record: dict, media: dict, key: str | None = None) -> EncodedSample:
        """Tokens, labels, positions and media tensors of one conversation. Raises OverLongSample (from the media
        headers, before decoding anything) / MediaError."""
        self.check_length(record, media)
        decoded = self.decode(record, media)
        return self.encode_decoded(record, decoded, key=key)

    def encode_canonical(self, record: dict, members: dict, key: str | None = None) -> EncodedSample:
        """``encode`` of a shard sample (record + canonical members by name): the same tensors as ``encode`` of the
        original files, plus the codes of its spoken answers (``talker_codes``, ``talker_turns``: only shards hold
        them). Raises ShardFormatError (shards of another media format), OverLongSample, MediaError."""
        self._check_length(record, self.canonical_shapes(record, members))
        encoded = self.encode_decoded(record, self.load_canonical(record, members), key=key)
        encoded.talker_codes = self.talker_codes(record, members)
        encoded.talker_turns = [(0, turn) for turn, _ in speech_turns(record)]
        return encoded

    def talker_codes(self, record: dict, members: dict) -> list:
        """The codes of a shard sample's spoken answers (int64 [groups, frames] each, in turn order), checked
        against the frames its ``media_meta.speech`` recorded."""
        meta, turns = self._canonical_meta(record).get("speech", []), speech_turns(record)
        if len(meta) != len(turns):
            raise ShardFormatError(f"sample {record.get('id')}: {len(turns)} spoken turns, media_meta.speech lists "
                                   f"{len(meta)}")
        out = []
        for (turn, name), entry in zip(turns, meta):
            try:
                codes = read_codes(members[name])
            except MediaError as exc:
                raise MediaError(f"speech of turn {turn} ({name}): {exc}") from None
            if codes.shape[1] != entry["frames"] or entry["turn"] != turn:
                raise ShardFormatError(f"sample {record.get('id')}: {name} holds {codes.shape[1]} frames of turn "
                                       f"{turn}, its media_meta says {entry['frames']} of turn {entry['turn']}")
            out.append(codes)
        return out

    def encode_decoded(self, record: dict, decoded: Decoded, key: str | None = None) -> EncodedSample:
        ids, labels = self.chat.tokenize(record["messages"])
        cfg, tok = self.media, self.chat.ids
        merge2 = cfg.merge_size**2

        pixel, grids = [], []
        for rgb in decoded.images:
            patches, grid = preprocess_image(rgb, cfg)
            pixel.append(patches)
            grids.append(grid)
        vpixel, vgrids, vsec = [], [], []
        for video in decoded.videos:
            patches, grid = preprocess_video(video, cfg)
            vpixel.append(patches)
            vgrids.append(grid)
            vsec.append(video.second_per_grid)

        # audio clips in token order: plain audios, plus video tracks when audio-in-video is on
        waves, blocks = [], []
        plain_audio_slot = {}
        for kind, index in media_tag_order(record):
            if kind == "audio":
                plain_audio_slot[index] = len(waves)
                waves.append(decoded.audios[index])
            elif kind == "video" and self.use_audio_in_video and decoded.videos[index].audio is not None:
                waves.append(decoded.videos[index].audio)
        features, mask = (audio_features(waves, cfg) if waves else (np.zeros((0, 128, 0), np.float32),
                                                                     np.zeros((0, 0), np.int64)))
        lengths = mask.sum(1).astype(np.int64)

        wave_index = 0
        for kind, index in media_tag_order(record):
            if kind == "image":
                blocks.append([tok["image_pad"]] * (int(np.prod(grids[index])) // merge2))
            elif kind == "audio":
                blocks.append([tok["audio_pad"]] * audio_output_lengths(int(lengths[wave_index]), cfg.n_window))
                wave_index += 1
            else:
                grid = vgrids[index]
                n_video = int(np.prod(grid)) // merge2
                if self.use_audio_in_video and decoded.videos[index].audio is not None:
                    n_audio = audio_output_lengths(int(lengths[wave_index]), cfg.n_window)
                    wave_index += 1
                    order = interleave_audio_video_tokens(n_video // grid[0], grid[0], vsec[index], n_audio,
                                                          self.position_id_per_seconds)
                    pad = {"V": tok["video_pad"], "A": tok["audio_pad"]}
                    blocks.append([tok["audio_start"], *[pad[c] for c in order], tok["audio_end"]])
                else:
                    blocks.append([tok["video_pad"]] * n_video)
        ids, labels = self.chat.expand(ids, labels, blocks)
        if len(ids) > self.max_seq_len:
            raise OverLongSample(f"{len(ids)} tokens after media expansion > max_seq_len {self.max_seq_len}")

        positions = rope_index(
            ids, token_ids=tok, image_grid_thw=grids, video_grid_thw=vgrids, audio_feature_lengths=lengths,
            video_second_per_grid=vsec, merge_size=cfg.merge_size,
            position_id_per_seconds=self.position_id_per_seconds, n_window=cfg.n_window,
            use_audio_in_video=self.use_audio_in_video)
        sid = str(record.get("id", key))
        return EncodedSample(
            __key__=key or sid,
            __restore_key__=(),
            __subflavors__=None,
            __sources__=None,
            sample_ids=[sid],
            input_ids=ids,
            labels=labels,
            position_ids=positions,
            seq_lens=[len(ids)],
            pixel_values=np.concatenate(pixel) if pixel else None,
            image_grid_thw=np.asarray(grids, dtype=np.int64) if grids else None,
            pixel_values_videos=np.concatenate(vpixel) if vpixel else None,
            video_grid_thw=np.asarray(vgrids, dtype=np.int64) if vgrids else None,
            video_second_per_grid=np.asarray(vsec, dtype=np.float32) if vsec else None,
            input_features=[features[i, :, :lengths[i]] for i in range(len(waves))],
            audio_feature_lengths=lengths if len(waves) else None,
        )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja")


def tokenizer_digest(hf_dir: Path) -> str:
    """sha256 over the checkpoint's tokenizer and chat-template files (names and bytes): equal digests tokenise
    every conversation the same."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(hf_dir) / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def media_from_paths(record: dict) -> dict:
    """Read the media bytes of a processed.jsonl record (absolute paths) into the (kind, index) mapping."""
    out = {}
    for kind, key in LIST_KEY.items():
        for index, path in enumerate(record.get(key, [])):
            out[(kind, index)] = Path(path).read_bytes()
    return out
