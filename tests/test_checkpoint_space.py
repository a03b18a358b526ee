"""A training checkpoint that would not fit its filesystem is refused before a byte is written, with the sizes.

Found by the full-depth LoRA run (a 64 GiB disk holding the 60 GB converted base): torch's writer failed midway with
'unexpected pos 704 vs 598' and no word of space. The state's tensors here are on the meta device: their sizes are
real (one larger than this filesystem's free space), their memory is never allocated."""

from __future__ import annotations

import shutil

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def parallel():
    from omni_model.runtime.parallel import init_parallel

    init_parallel()


def _sharded(key: str, tensor: torch.Tensor, replica_id: int = 0):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return ShardedTensor.from_rank_offsets(key, tensor, replica_id=replica_id)


def test_written_bytes_count_main_replicas_only():
    from omni_model.train.checkpointing import written_bytes

    state = {"model": {"a": _sharded("a", torch.zeros(1000)), "b": _sharded("b", torch.zeros(10, dtype=torch.bfloat16)),
                       "copy": _sharded("c", torch.zeros(500), replica_id=1)},
             "iteration": 7, "scheduler": {"lr": 0.1}}
    assert written_bytes(state) == 1000 * 4 + 10 * 2


def test_a_checkpoint_larger_than_the_free_space_is_refused_before_writing(tmp_path):
    from omni_model.train.checkpointing import CheckpointSpaceError, require_space_for

    target = tmp_path / "iter_0000003.tmp"
    target.mkdir()
    free = shutil.disk_usage(tmp_path).free
    too_big = {"optimizer": _sharded("exp_avg", torch.empty(free // 4 + 2**28, device="meta"))}
    with pytest.raises(CheckpointSpaceError, match=r"the checkpoint needs [0-9.]+ GiB but .* has [0-9.]+ GiB free"):
        require_space_for(too_big, target)
    assert list(target.iterdir()) == []
    require_space_for({"optimizer": _sharded("exp_avg", torch.empty(2**20, device="meta"))}, target)  # 4 MiB fits
