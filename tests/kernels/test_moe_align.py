"""moe_align: slots sorted by expert, each expert's run padded to the block height, empty experts skipped."""

from __future__ import annotations

import torch

from mixtral_local.kernels.fused_moe import moe_align

BLOCK_M = 4


def _align(expert_ids: list[list[int]], n_experts: int = 5):
    return moe_align(torch.tensor(expert_ids), n_experts, BLOCK_M)


def test_real_positions_hold_every_slot_once():
    ids = [[3, 1], [3, 0], [1, 3], [4, 3]]
    align = _align(ids)
    real = align.sorted_slots[align.sorted_slots < 8]
    assert sorted(real.tolist()) == list(range(8))


def test_each_block_holds_slots_of_its_expert_only():
    ids = [[3, 1], [3, 0], [1, 3], [4, 3], [3, 4]]
    flat = torch.tensor(ids).flatten()
    align = _align(ids)
    used = int(align.num_padded)
    for block in range(used // BLOCK_M):
        slots = align.sorted_slots[block * BLOCK_M : (block + 1) * BLOCK_M]
        slots = slots[slots < flat.numel()].long()
        assert (flat[slots] == align.block_expert[block]).all()


def test_each_expert_run_is_padded_to_the_block_height():
    ids = [[3, 1], [3, 0], [1, 3], [4, 3], [3, 4]]  # expert 3: 5 slots -> 2 blocks; 0, 1, 4: 1 block each
    align = _align(ids)
    assert int(align.num_padded) == 5 * BLOCK_M
    used = align.block_expert[: int(align.num_padded) // BLOCK_M].tolist()
    assert sorted(used) == [0, 1, 3, 3, 4]


def test_experts_without_slots_own_no_block():
    align = _align([[2, 2], [2, 2]], n_experts=8)  # only expert 2 is hit
    used = align.block_expert[: int(align.num_padded) // BLOCK_M]
    assert used.tolist() == [2]


def test_blocks_past_the_end_belong_to_no_expert():
    align = _align([[2, 0]], n_experts=8)
    spare = align.block_expert[int(align.num_padded) // BLOCK_M :]
    assert spare.numel() > 0 and (spare == -1).all()


def test_padding_positions_hold_the_slot_count():
    align = _align([[2, 0], [2, 1]])
    sorted_slots = align.sorted_slots.tolist()
    assert sorted_slots.count(4) == len(sorted_slots) - 4
