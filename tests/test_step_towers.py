"""PerfOptions.step_tower_forward: with frozen towers, every micro-batch's media of a training step go through each
tower in ONE forward at the step's start (thinker.tower_outputs, train.forward_step.step_tower_outputs), and each
micro-batch merges its share instead of running the towers itself.

* Thinker: four micro-batches (images, videos and audio clips of different sizes, padded audio features, one with no
  media) through `tower_outputs` at once, then each merged from its share, against each micro-batch's own forward
  (fp32, CPU, sharpened weights: a misplaced row shows): decoder input, visual_pos_masks, deepstack levels and
  logits equal (measured: max abs difference 0); one vision and one audio forward for all four (vision: two, images
  then videos, with joint_visual_forward off); the placeholder checks name the same counts.
* Training: two steps of two micro-batches with the towers frozen, switch on against off, same weights and batches:
  the same losses, grad norms, token counts and trained parameters (measured: bit-equal), the vision tower called
  once per step instead of once per micro-batch. Trained towers (or one of them): per micro-batch, as before. A step
  of more micro-batches than a group (STEP_TOWER_GROUP) runs the towers a group at a time, read lazily.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from encoder_parity_utils import vision_inputs
from llm_helpers import sharp_fp32_thinker
from omni_model.configs import TOKEN_IDS
from train_helpers import encode_demo_samples, packed_micro_batches

warnings.filterwarnings("ignore")

TOL = dict(rtol=1e-6, atol=1e-6)
PADS = {"image": TOKEN_IDS["image_pad"], "video": TOKEN_IDS["video_pad"], "audio": TOKEN_IDS["audio_pad"]}
# per micro-batch: image grids, video grids, audio clips' mel frames (several clips: padded to the longest)
MEDIA = [
    dict(images=[[1, 4, 6], [1, 8, 4]], videos=[[2, 4, 4]], audios=[300, 180]),
    dict(images=[[1, 6, 6]], videos=[], audios=[420]),
    dict(images=[], videos=[[3, 6, 4], [2, 4, 8]], audios=[]),
    dict(images=[], videos=[], audios=[]),
]


@pytest.fixture(scope="module")
def thinker(tiny_hf_dir, tmp_path_factory):
    return sharp_fp32_thinker(tiny_hf_dir, tmp_path_factory.mktemp("sharp") / "hf")


def _merged(grid) -> int:
    t, h, w = grid
    return t * h * w // 4


def _micro_batch(thinker, k: int, images, videos, audios) -> dict:
    """embed_multimodal's keywords of one micro-batch: two rows, the media's placeholders spread over them in order
    (row 0 the first half of the items, row 1 the rest), text between and after."""
    from omni_model.model.audio_lengths import audio_output_lengths

    g = torch.Generator().manual_seed(10 + k)
    items = ([("audio", int(audio_output_lengths(n, thinker.audio_model.n_window))) for n in audios]
             + [("image", _merged(grid)) for grid in images] + [("video", _merged(grid)) for grid in videos])
    half = (len(items) + 1) // 2
    rows = [torch.cat([torch.cat([torch.full((n,), PADS[kind]), torch.randint(100, 5000, (3,), generator=g)])
                       for kind, n in part] + [torch.randint(100, 5000, (4,), generator=g)])
            for part in (items[:half], items[half:])]
    length = max(len(row) for row in rows)
    ids = torch.stack([torch.cat([row, torch.randint(100, 5000, (length - len(row),), generator=g)]) for row in rows])
    inputs = {"input_ids": ids}
    if images:
        inputs["pixel_values"], inputs["image_grid_thw"] = vision_inputs(images, seed=20 + k)
    if videos:
        inputs["pixel_values_videos"], inputs["video_grid_thw"] = vision_inputs(videos, seed=30 + k)
    if audios:
        frames = max(audios)
        features = torch.randn(len(audios), 128, frames, generator=g)
        mask = (torch.arange(frames)[None] < torch.tensor(audios)[:, None]).long()
        inputs.update(input_features=features * mask[:, None], feature_attention_mask=mask,
                      audio_feature_lengths=torch.tensor(audios))
    return inputs


@pytest.fixture(scope="module")
def micro_batches(thinker):
    return [_micro_batch(thinker, k, **media) for k, media in enumerate(MEDIA)]


def _media(inputs: dict) -> dict:
    from omni_model.model.thinker import MEDIA_KEYS

    return {name: value for name, value in inputs.items() if name in MEDIA_KEYS}


def _without_media(inputs: dict) -> dict:
    return {name: value for name, value in inputs.items() if name not in _media(inputs)}


def _use(thinker, **options):
    from omni_model.model.options import PerfOptions, apply_options

    apply_options(thinker, PerfOptions(**options))


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


def _compare(merged, own) -> float:
    """Max abs difference of two embed_multimodal results (decoder input, visual_pos_masks, deepstack levels)."""
    (embeds, masks, deepstack), (embeds_ref, masks_ref, deepstack_ref) = merged, own
    torch.testing.assert_close(embeds, embeds_ref, **TOL)
    assert (masks is None) == (masks_ref is None) and (masks is None or torch.equal(masks, masks_ref))
    assert len(deepstack or []) == len(deepstack_ref or [])
    for level, level_ref in zip(deepstack or [], deepstack_ref or []):
        torch.testing.assert_close(level, level_ref, **TOL)
    levels = zip(deepstack or [], deepstack_ref or [])
    return max([_max_diff(embeds, embeds_ref)] + [_max_diff(a, b) for a, b in levels])


@pytest.mark.parametrize("joint", [True, False], ids=["joint_visual", "visual_apart"])
def test_the_step_forward_gives_each_micro_batch_its_own_forwards_merge(thinker, micro_batches, joint):
    _use(thinker, joint_visual_forward=joint)
    with torch.no_grad():
        outputs = thinker.tower_outputs([_media(inputs) for inputs in micro_batches])
        diffs = []
        for inputs, towers in zip(micro_batches, outputs):
            own = thinker.embed_multimodal(**inputs)
            merged = thinker.embed_multimodal(**_without_media(inputs), tower_outputs=towers)
            diffs.append(_compare(merged, own))
    assert outputs[3].audio is None and outputs[3].image is None and outputs[3].video is None
    assert outputs[1].video is None and outputs[2].audio is None and outputs[2].image is None
    # the media move the decoder input and differ between items: a row shifted to another item would show
    visual = outputs[0].image[0]
    assert visual.std() > 0.1 and _max_diff(visual[1:], visual[:-1]) > 0.1
    print(f"step tower forward ({'joint' if joint else 'apart'}) vs each micro-batch's own: max abs difference "
          f"{max(diffs):.2e} (decoder input, deepstack levels; {len(micro_batches)} micro-batches)")


def test_the_step_forward_gives_each_micro_batch_its_own_logits(thinker, micro_batches):
    _use(thinker)
    with torch.no_grad():
        outputs = thinker.tower_outputs([_media(inputs) for inputs in micro_batches])
        diffs = []
        for inputs, towers in zip(micro_batches, outputs):
            ids = inputs["input_ids"]
            position_ids = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, ids.shape[0], -1)
            own = thinker(position_ids=position_ids, **inputs)
            merged = thinker(position_ids=position_ids, **_without_media(inputs), tower_outputs=towers)
            torch.testing.assert_close(merged, own, **TOL)
            diffs.append(_max_diff(merged, own))
    print(f"step tower forward vs each micro-batch's own: max abs logit difference {max(diffs):.2e}")


def _calls(module, record):
    calls = []
    return calls, module.register_forward_pre_hook(lambda _, args: calls.append(record(args)))


@pytest.mark.parametrize("joint", [True, False], ids=["joint_visual", "visual_apart"])
def test_one_forward_per_tower_for_all_micro_batches(thinker, micro_batches, joint):
    _use(thinker, joint_visual_forward=joint)
    vision, vision_hook = _calls(thinker.vision_model, lambda args: args[1].tolist())
    audio, audio_hook = _calls(thinker.audio_model, lambda args: args[0].shape)
    try:
        with torch.no_grad():
            thinker.tower_outputs([_media(inputs) for inputs in micro_batches])
    finally:
        vision_hook.remove()
        audio_hook.remove()
    items = {kind: [grid for media in MEDIA for grid in media[kind]] for kind in ("images", "videos")}
    in_order = [grid for media in MEDIA for grid in media["images"] + media["videos"]]
    assert vision == ([in_order] if joint else [items["images"], items["videos"]])
    assert len(audio) == 1 and audio[0][-1] == sum(n for media in MEDIA for n in media["audios"])


def test_the_merge_of_given_outputs_names_a_placeholder_count_mismatch(thinker, micro_batches):
    from omni_model.model.thinker import PlaceholderMismatch

    _use(thinker)
    inputs = micro_batches[0]
    ids = inputs["input_ids"].clone()
    first = (ids == PADS["video"]).nonzero()[0]
    ids[first[0], first[1]] = 42  # one video placeholder short
    n = sum(map(_merged, MEDIA[0]["videos"]))
    with torch.no_grad():
        towers = thinker.tower_outputs([_media(inputs)])[0]
        with pytest.raises(PlaceholderMismatch, match=rf"video: the input has {n - 1} <video pad> tokens but the video "
                                                      rf"encoder produced {n}"):
            thinker.embed_multimodal(ids, tower_outputs=towers)
        # video placeholders (micro-batch 2 has videos only) but no video outputs: the count against none
        n = sum(map(_merged, MEDIA[2]["videos"]))
        with pytest.raises(PlaceholderMismatch, match=rf"video: the input has {n} <video pad> tokens but the video "
                                                      rf"encoder produced 0"):
            thinker.embed_multimodal(micro_batches[2]["input_ids"], tower_outputs=thinker.tower_outputs([{}])[0])


def test_outputs_and_media_together_are_refused(thinker, micro_batches):
    inputs = micro_batches[1]
    with torch.no_grad():
        towers = thinker.tower_outputs([_media(inputs)])[0]
        with pytest.raises(ValueError, match=r"tower_outputs given with media inputs \['pixel_values'"):
            thinker.embed_multimodal(**inputs, tower_outputs=towers)


# -- the training step -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def step_batches(tiny_hf_dir, tmp_path_factory):
    """Two steps of two packed micro-batches, each with images or videos (and audio in three)."""
    samples = encode_demo_samples(tiny_hf_dir, tmp_path_factory.mktemp("demo"))
    return packed_micro_batches(samples, [["image_audio", "video"], ["video", "text"], ["text", "image_audio"],
                                          ["image_audio"]])


def _training_run(tiny_hf_dir, tmp_path, batches, options, frozen=("vision", "audio"), steps: int = 2,
                  lookahead: bool = False, save_interval: int = 0):
    """The loop's Run of `steps` steps of two micro-batches over `batches` (tiny weights, towers frozen as `frozen`
    says), built with `options`; `lookahead`: the Run keeps its prefetch across steps, as the training loop's does."""
    from omni_model.convert.mapping import load_hf_into_model
    from omni_model.train import build
    from omni_model.train.data import TokenCounter
    from omni_model.train.forward_step import forward_step
    from omni_model.train.loop import Run, new_prefetch
    from omni_model.train.metrics import FlopCounter
    from omni_model.train.settings import TrainSettings

    settings = TrainSettings(hf_dir=str(tiny_hf_dir), init_checkpoint="", shards="", train_dir=str(tmp_path),
                             train=dict(iters=steps, lr_warmup_iters=0, micro_batch_size=1, global_batch_size=2,
                                        clip_grad=1.0, lr=1e-3, seed=1234, gpus_per_node=0, save_interval=save_interval,
                                        freeze_vision="vision" in frozen, freeze_audio="audio" in frozen))
    build.init_training_parallel(settings)
    training = build.build_training(settings, load_initial_weights=False, options=options)
    load_hf_into_model(training.thinker, tiny_hf_dir, prefix="")
    training.optimizer.reload_model_params()
    return Run(settings=settings, training=training, forward_step=forward_step, digest="", loader=None,
               batches=TokenCounter(batches), evaluation=[], flops=FlopCounter(tiny_hf_dir), peak=None, log=None,
               prefetch=new_prefetch(forward_step) if lookahead else None)


def _trained(run) -> dict:
    return {name: p.detach().clone() for name, p in run.training.thinker.named_parameters() if p.requires_grad}


def _train(tiny_hf_dir, tmp_path, batches, step_towers: bool, frozen=("vision", "audio"), steps: int = 2):
    """`steps` steps of two micro-batches through the training loop's step, towers frozen as `frozen` says: the step
    records, the final trained parameters, the vision tower's calls (their grids) and how far the weights moved."""
    from omni_model.model.options import PerfOptions
    from omni_model.train.loop import step

    run = _training_run(tiny_hf_dir, tmp_path, iter(batches), PerfOptions(step_tower_forward=step_towers), frozen,
                        steps)
    initial = _trained(run)
    calls, hook = _calls(run.training.thinker.vision_model, lambda args: args[1].tolist())
    try:
        records = [step(run, i) for i in range(1, steps + 1)]
    finally:
        hook.remove()
    params = _trained(run)
    moved = max((initial[n] - p).abs().max().item() for n, p in params.items())
    return records, params, calls, moved


def test_frozen_towers_run_once_per_step_and_train_the_same(tiny_hf_dir, tmp_path, step_batches):
    """Two steps, towers frozen: switch on and off train alike (losses, grad norms, counts, every trained parameter);
    the vision tower is called once per step over both micro-batches' grids instead of once per micro-batch."""
    once, once_params, once_calls, moved = _train(tiny_hf_dir, tmp_path / "step", step_batches, True)
    each, each_params, each_calls, _ = _train(tiny_hf_dir, tmp_path / "micro", step_batches, False)
    assert moved > 1e-4  # the first step's update reaches the second step's loss
    assert len(once_calls) == 2 and len(each_calls) == 4  # once per step; once per micro-batch
    assert once_calls == [each_calls[0] + each_calls[1], each_calls[2] + each_calls[3]]
    keys = ("loss", "grad_norm", "label_tokens", "tokens", "samples", "padded_tokens", "flops_vision", "flops_audio")
    for ours, theirs in zip(once, each):
        assert {k: ours[k] for k in keys} == pytest.approx({k: theirs[k] for k in keys}, rel=1e-6, abs=0)
    assert once_params.keys() == each_params.keys() and not any(n.startswith(("vision", "audio")) for n in once_params)
    worst = max(_max_diff(p, each_params[n]) / max(each_params[n].abs().max().item(), 1e-30)
                for n, p in once_params.items())
    print(f"towers once per step vs per micro-batch, 2 steps: losses {[r['loss'] for r in once]} vs "
          f"{[r['loss'] for r in each]}, grad norms {[r['grad_norm'] for r in once]} vs "
          f"{[r['grad_norm'] for r in each]}; trained parameters: max difference {worst:.2e} of a parameter's largest "
          f"entry, bit-equal {all(torch.equal(p, each_params[n]) for n, p in once_params.items())}")
    for name, param in once_params.items():
        torch.testing.assert_close(param, each_params[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("frozen", [(), ("audio",)], ids=["both_trained", "vision_trained"])
def test_trained_towers_run_per_micro_batch_with_the_switch_on(tiny_hf_dir, tmp_path, step_batches, frozen):
    """A trained tower (both, or the vision tower alone) keeps the per-micro-batch forward: one call each, and the
    switch changes nothing."""
    on, on_params, on_calls, _ = _train(tiny_hf_dir, tmp_path / "on", step_batches[:2], True, frozen=frozen, steps=1)
    off, off_params, off_calls, _ = _train(tiny_hf_dir, tmp_path / "off", step_batches[:2], False, frozen=frozen,
                                           steps=1)
    assert len(on_calls) == 2 and on_calls == off_calls
    assert any(n.startswith("vision_model.") for n in on_params)  # the vision tower is trained
    assert on[0]["loss"] == off[0]["loss"] and on[0]["grad_norm"] == off[0]["grad_norm"]
    assert all(torch.equal(p, off_params[n]) for n, p in on_params.items())


def test_the_prefetch_leaves_trained_towers_and_other_items_alone(tiny_hf_dir, tmp_path, step_batches):
    """step_tower_outputs (what optimizer_step calls through forward_step.prefetch): frozen towers give each batch its
    outputs; an item that is not an OmniBatch is passed on for forward_step's TypeError; one trained tower parameter
    and the iterator comes back as it is."""
    from omni_model.train.forward_step import StepTowers, WithTowerOutputs, forward_step, step_tower_outputs

    assert forward_step.prefetch is StepTowers
    training = _frozen_towers_training(tiny_hf_dir, tmp_path, micro_batches=2)
    model = training.model
    items = iter(step_batches[:2])
    prefetched = list(step_tower_outputs(model, items, 2))
    assert [type(item) for item in prefetched] == [WithTowerOutputs] * 2
    assert all(item.batch is batch for item, batch in zip(prefetched, step_batches[:2]))
    assert prefetched[0].towers.audio is not None and prefetched[1].towers.audio is None
    not_batches = iter(["a", "b"])  # passed on for forward_step to refuse by name
    passed = step_tower_outputs(model, not_batches, 2)
    with pytest.raises(TypeError, match="forward_step needs an OmniBatch .* got str"):
        forward_step(passed, model)
    training.thinker.vision_model.patch_embed.proj.weight.requires_grad_(True)  # one tower parameter trained
    untouched = iter(step_batches[:2])
    assert step_tower_outputs(model, untouched, 2) is untouched


def test_many_micro_batches_go_through_the_towers_a_group_at_a_time(tiny_hf_dir, tmp_path, step_batches):
    """A step of 5 micro-batches (gradient accumulation) runs the frozen towers per group of 2 (2 + 2 + 1 forwards),
    each group read from the data iterator only when the schedule reaches it: what the towers hold at once stays
    bounded however many micro-batches a step has. Each micro-batch's outputs equal its own forward's."""
    from omni_model.model.thinker import MEDIA_KEYS
    from omni_model.train.forward_step import step_tower_outputs

    training = _frozen_towers_training(tiny_hf_dir, tmp_path, micro_batches=5)
    thinker = training.thinker
    calls = []
    hook = thinker.vision_model.register_forward_pre_hook(lambda module, args: calls.append(len(args[1])))
    five = step_batches + step_batches[:1]
    read = []
    source = (read.append(batch) or batch for batch in five)
    try:
        items = step_tower_outputs(training.model, source, len(five), group=2)
        first = next(items)
        assert len(read) == 2 and len(calls) == 1  # only the first group read and through the towers
        grouped = [first, *items]
    finally:
        hook.remove()
    assert len(read) == 5 and len(calls) == 3
    with torch.no_grad():
        for item, batch in zip(grouped, five):
            assert item.batch is batch
            media = {name: getattr(batch, name) for name in MEDIA_KEYS if getattr(batch, name) is not None}
            alone = thinker.tower_outputs([media])[0]
            for kind in ("audio", "image", "video"):
                got, expect = getattr(item.towers, kind), getattr(alone, kind)
                assert (got is None) == (expect is None), kind
                if expect is not None:
                    torch.testing.assert_close(got, expect, **TOL)


def _frozen_towers_training(tiny_hf_dir, tmp_path, micro_batches: int):
    """The training objects (random weights) of a step of `micro_batches` micro-batches, both towers frozen."""
    from omni_model.train import build
    from omni_model.train.settings import TrainSettings

    settings = TrainSettings(hf_dir=str(tiny_hf_dir), init_checkpoint="", shards="", train_dir=str(tmp_path),
                             train=dict(iters=1, micro_batch_size=1, global_batch_size=micro_batches,
                                        gpus_per_node=0, freeze_vision=True, freeze_audio=True))
    build.init_training_parallel(settings)
    return build.build_training(settings, load_initial_weights=False)


def _look_ahead_run(tiny_hf_dir, tmp_path, batches, lookahead: bool, steps: int, save_interval: int = 0):
    """`steps` loop steps with the Run's prefetch kept across them, PerfOptions.tower_lookahead = `lookahead`: the
    records, the trained parameters, the order of the vision tower's calls ("towers") and the optimizer updates
    ("update"), and how many batches were read from `batches`."""
    from omni_model.model.options import PerfOptions
    from omni_model.train.loop import step

    read = []
    source = (read.append(batch) or batch for batch in batches)
    run = _training_run(tiny_hf_dir, tmp_path, source, PerfOptions(tower_lookahead=lookahead), steps=steps,
                        lookahead=True, save_interval=save_interval)
    order, hook = _calls(run.training.thinker.vision_model, lambda args: "towers")
    optimizer, update = run.training.optimizer, run.training.optimizer.step
    optimizer.step = lambda *args, **kwargs: order.append("update") or update(*args, **kwargs)
    try:
        records = [step(run, i) for i in range(1, steps + 1)]
    finally:
        hook.remove()
        optimizer.step = update
    return records, _trained(run), order, len(read)


def test_the_next_steps_towers_run_before_this_steps_update_and_train_the_same(tiny_hf_dir, tmp_path, step_batches):
    """PerfOptions.tower_lookahead: the next step's first micro-batches go through the frozen towers before this
    step's optimizer update (so their launches overlap this step's backward on a GPU). Three steps against the switch
    off: the same losses, grad norms, per-step token and sample counts (each step counts its own batches, not the ones
    read for the next) and trained parameters, bit for bit; the last step reads nothing ahead (the iterator is read
    exactly as far as the steps need)."""
    batches = step_batches + step_batches[:2] + step_batches[2:]  # 3 steps of 2, and 2 batches no step needs
    ahead, ahead_params, ahead_order, ahead_read = _look_ahead_run(tiny_hf_dir, tmp_path / "ahead", batches, True, 3)
    start, start_params, start_order, start_read = _look_ahead_run(tiny_hf_dir, tmp_path / "start", batches, False, 3)
    assert start_order == ["towers", "update"] * 3
    assert ahead_order == ["towers", "towers", "update", "towers", "update", "update"]
    assert ahead_read == start_read == 6
    keys = ("loss", "grad_norm", "label_tokens", "tokens", "samples", "padded_tokens", "flops_vision", "flops_audio")
    assert [{k: r[k] for k in keys} for r in ahead] == [{k: r[k] for k in keys} for r in start]
    assert len({r["tokens"] for r in ahead}) > 1  # the steps' batches differ: a count off by a step shows
    assert ahead_params.keys() == start_params.keys()
    assert all(torch.equal(p, start_params[n]) for n, p in ahead_params.items())


def test_no_look_ahead_before_a_checkpoint(tiny_hf_dir, tmp_path, step_batches):
    """A step followed by a checkpoint (save_interval 2: after step 2) reads nothing for the next step: the loader
    state the checkpoint saves must not count batches that no step has trained on (a resumed run would skip them)."""
    batches = step_batches + step_batches[:2]
    _, _, order, read = _look_ahead_run(tiny_hf_dir, tmp_path, batches, True, 3, save_interval=2)
    assert order == ["towers", "towers", "update", "update", "towers", "update"]
    assert read == 6


def test_token_counter_leaves_the_batches_read_ahead_to_the_next_step(step_batches):
    from omni_model.train.data import TokenCounter

    counter = TokenCounter(iter(step_batches))
    first, second, third = next(counter), next(counter), next(counter)
    counts = counter.take(held=[third])
    assert counts["tokens"] == int(first.num_tokens) + int(second.num_tokens)
    assert counter.take()["tokens"] == int(third.num_tokens)
    next(counter)
    with pytest.raises(ValueError, match="held for the next step are not the last ones read"):
        counter.take(held=[first])
