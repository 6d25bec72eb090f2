import torch

from hf_lossfree_moe_scripts.routing_dynamics import (
    fixed_point_candidate,
    held_out_fold_maxvio,
    maxvio_of,
)


# Four tokens, four experts, top-1: unbiased, expert 0 has the top score of every token.
SCORES = torch.tensor(
    [
        [0.9, 0.1, 0.2, 0.3],
        [0.8, 0.2, 0.1, 0.4],
        [0.7, 0.3, 0.6, 0.1],
        [0.6, 0.5, 0.2, 0.1],
    ]
)


def test_maxvio_of_routes_the_scores_with_the_bias():
    # unbiased: loads [4, 0, 0, 0], MaxVio 4 / 1 - 1 = 3; with this bias the biased rows pick experts 0, 3, 2, 1
    # ([0.45, 0.1, 0.2, 0.4], [0.35, 0.2, 0.1, 0.5], [0.25, 0.3, 0.6, 0.2], [0.15, 0.5, 0.2, 0.2]): MaxVio 0
    balancing = torch.tensor([-0.45, 0.0, 0.0, 0.1])
    assert maxvio_of([SCORES], torch.zeros(1, 4), top_k=1) == 3.0
    assert maxvio_of([SCORES, SCORES], torch.stack([torch.zeros(4), balancing]), top_k=1) == 1.5


def test_fixed_point_candidate_gives_every_expert_about_its_share_of_the_batch():
    # 512 tokens, 8 experts, top-2: a share of 128; expert e's scores are offset by e / 14, so unbiased routing favours
    # the last experts (MaxVio above 1); the fixed point leaves only ties at the threshold (a few tokens)
    scores = torch.rand(512, 8, generator=torch.Generator().manual_seed(0)) + torch.linspace(0, 0.5, 8)
    bias = fixed_point_candidate(scores, torch.zeros(8), top_k=2)
    assert abs(bias.mean().item()) < 1e-6
    assert maxvio_of([scores], torch.zeros(1, 8), top_k=2) > 1.0
    assert maxvio_of([scores], bias.unsqueeze(0), top_k=2) <= 4 / 128


def test_held_out_folds_alike_are_balanced_and_a_different_fold_is_not():
    # 3 folds of chunks of 2 blocks of 64 tokens, dealt in turn: chunk c (128 tokens) goes to fold c % 3. Every fold
    # holding the same scores: the bias that balances the other two balances it too (to ties at the threshold, a few
    # tokens of a share of 64). A fold whose expert 0 scores 2 higher sends expert 0 every one of its tokens (top-1)
    # against the others' balancing bias: loads [n, 0, 0, 0], MaxVio 3; the other folds lose a third of their
    # reference, so they stay near balance, not at it.
    rows = torch.rand(128, 4, generator=torch.Generator().manual_seed(0))
    same = rows.repeat(3, 1)  # chunks 0, 1, 2: one per fold
    folds = held_out_fold_maxvio([same], torch.zeros(1, 4), top_k=1, block_size=64, folds=3, chunk_blocks=2)
    assert len(folds) == 3 and max(folds) <= 4 / 32
    shifted = same.clone()
    shifted[128:256, 0] += 2.0  # chunk 1, fold 1
    folds = held_out_fold_maxvio([shifted], torch.zeros(1, 4), top_k=1, block_size=64, folds=3, chunk_blocks=2)
    assert folds[1] == 3.0 and max(folds[0], folds[2]) < 1.0
