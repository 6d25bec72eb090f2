"""The replay's Expert Choice runs (RQ4), its leakage bound, and MaxVio over computation batches (RQ3)."""

import math
from dataclasses import replace

import pytest
import torch
from datasets import Dataset, DatasetDict

from conftest import REPLAY_TINY_SCALE
from hf_lossfree_moe import LossFreeBalancer
from hf_lossfree_moe_scripts.reproduce.batch_report import (
    computation_batch_table,
    expert_choice_section,
    leakage_setting,
)
from hf_lossfree_moe_scripts.reproduce.leakage import binary_entropy, leakage_bound_bits
from hf_lossfree_moe_scripts.reproduce.loads import (
    computation_batch_sizes,
    evaluate_by_sequence,
    maxvio_by_batch_size,
)
from hf_lossfree_moe_scripts.reproduce.methods import METHODS, select_comparisons
from hf_lossfree_moe_scripts.reproduce.runs import RunSpec, Scale, build_model, measure_held_out, train_and_evaluate


TINY_SCALE = replace(REPLAY_TINY_SCALE, max_steps=3)


def test_leakage_bound_by_hand():
    assert binary_entropy(0.5) == 1.0
    assert binary_entropy(0.0) == binary_entropy(1.0) == 0.0
    # p = K / E = 1/2: every decision can be a full bit, L * E of them
    assert leakage_bound_bits(3, 4, 2, 1.0) == 12.0
    # the replay's model: 3 MoE layers, 16 experts, top-2: 48 * H(1/8) = 48 * 0.5436
    assert leakage_bound_bits(3, 16, 2, 1.0) == pytest.approx(48 * (1 / 8 * 3 + 7 / 8 * math.log2(8 / 7)))
    assert leakage_bound_bits(3, 16, 2, 8.0) == 0.0  # every expert picks every token: nothing to tell
    with pytest.raises(ValueError, match="capacity_factor must be a positive number"):
        leakage_bound_bits(3, 16, 2, 0.0)
    with pytest.raises(ValueError, match="num_experts must be a positive integer"):
        leakage_bound_bits(3, 0, 2, 1.0)
    assert leakage_setting(Scale()).startswith("at most 26.1 bits per token")


def test_computation_batch_sizes_double_up_to_the_whole_split():
    assert computation_batch_sizes(361) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 361]
    assert computation_batch_sizes(8) == [1, 2, 4, 8]
    assert computation_batch_sizes(1) == [1]


def test_maxvio_by_batch_size_by_hand():
    """Two kinds of sequences, [3, 1] and [1, 3] (one layer, two experts): alone each has MaxVio (3 - 2) / 2 = 0.5;
    all four together load [8, 8], MaxVio 0. A batch of 3 (the fourth sequence is left out) loads [7, 5] or [5, 7]."""
    loads = torch.tensor([[[3, 1]], [[1, 3]], [[3, 1]], [[1, 3]]])  # (N, L, E)
    by_size = maxvio_by_batch_size(loads, layers=[1], sizes=[1, 3, 4])
    assert by_size[1] == 0.5
    assert by_size[3] == pytest.approx((7 - 6) / 6)  # any three load [7, 5] or [5, 7]
    assert by_size[4] == 0.0


def test_sequence_loads_add_up_to_the_balancers_count():
    model = build_model(METHODS["loss_free"], TINY_SCALE, vocab_size=128, seed=0)
    blocks = torch.randint(0, 128, (7, 16))
    balancer = LossFreeBalancer(model)
    loss, loads = measure_held_out(model, balancer, blocks, batch_size=3)
    sequence_loss, sequence_loads = evaluate_by_sequence(model, blocks, batch_size=3)
    assert sequence_loads.shape == (7, 2, 8)
    assert torch.equal(sequence_loads.sum(dim=0), loads)
    assert torch.equal(sequence_loads.sum(dim=-1), torch.full((7, 2), 16 * 2))  # S tokens x top-2 per sequence
    assert sequence_loss == pytest.approx(loss, rel=1e-6)


@pytest.fixture
def tiny_blocks():
    def blocks(count: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 128, (count, 16), generator=generator).tolist()
        return Dataset.from_dict({"input_ids": ids, "labels": ids, "attention_mask": [[1] * 16] * count})

    return DatasetDict(train=blocks(24, 0), validation=blocks(6, 1))


@pytest.mark.parametrize("name", ["expert_choice_batch", "expert_choice_sequence", "expert_choice_sequence_shuffled"])
def test_expert_choice_runs_are_balanced_in_every_step(tiny_blocks, one_thread, name):
    result = train_and_evaluate(RunSpec(METHODS[name], 0, TINY_SCALE, tiny_blocks, vocab_size=128))
    assert result.maxvio_batch == [0.0] * 3  # every expert picks the same number of tokens in every chunk
    assert result.maxvio_global == result.maxvio_global_train == 0.0
    assert result.layers == [1, 2]
    assert torch.equal(torch.tensor(result.val_loads), torch.full((2, 8), 6 * 16 * 2 // 8))
    assert math.isfinite(result.val_perplexity) and len(result.train_loss) == 3
    if name == "expert_choice_batch":  # shuffling tokens within the one chunk of a batch changes no pick
        assert result.val_perplexity_shuffled_routing == pytest.approx(result.val_perplexity, rel=1e-6)
    else:
        assert math.isfinite(result.val_perplexity_shuffled_routing)


def test_expert_choice_ablation_sets_expert_choice_against_loss_free():
    comparison = select_comparisons(["expert_choice"], include_main=False)[0]
    assert comparison.methods[0] == "loss_free"
    assert {METHODS[name].config.get("expert_choice_chunk_size") for name in comparison.methods[1:]} == {None, 1}
    assert any(METHODS[name].config.get("expert_choice_shuffle") for name in comparison.methods)


def test_computation_batch_table_lists_token_choice_methods_only(tiny_blocks, one_thread):
    results = [
        train_and_evaluate(RunSpec(METHODS[name], 0, TINY_SCALE, tiny_blocks, vocab_size=128))
        for name in ("none", "expert_choice_batch")
    ]
    assert list(results[0].maxvio_by_batch_size) == [1, 2, 4, 6]
    lines = computation_batch_table(results).splitlines()
    assert lines[0] == "| Method | 1 seq. | 2 seq. | 4 seq. | 6 seq. |"
    assert len(lines) == 3 and lines[2].startswith("| No balancing |")
    section = expert_choice_section(results).splitlines()
    assert section[0] == "## Expert Choice: what the leak is worth (RQ4)"
    row = next(line for line in section if line.startswith("| Expert Choice, chunk = the batch |"))
    assert row.split(" | ")[1] == f"{results[1].val_perplexity:.2f}"
