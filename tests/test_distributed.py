"""Two CPU processes (gloo) launched with torchrun; the scenarios themselves are in `distributed_scenarios.py`."""

from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

from conftest import TINY, run_on_two_ranks
from distributed_scenarios import LAYOUTS, LENGTHS, TRAINER_STEPS, global_batch, make_model
from hf_lossfree_moe import (
    LossFreeBalancer,
    LossFreeMoeConfig,
    LossFreeMoeForCausalLM,
    add_balancing_callback,
    compute_maxvio,
)
from test_callbacks import make_trainer, padded_examples


TOP_K = 2
# Layouts whose two ranks route different rows: their counts are summed over both; tp ranks share theirs.
DATA_PARALLEL_LAYOUTS = {"fsdp", "ep_fsdp", "hsdp"}


class SingleProcessStep(NamedTuple):
    loads: torch.Tensor  # (routers, experts) of the global batch
    biases: torch.Tensor  # after one step()
    loss: float


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the two ranks ended with, one run for all tests of this module."""
    out_dir = tmp_path_factory.mktemp("dist")
    make_model().save_pretrained(out_dir / "model")
    LossFreeMoeForCausalLM(LossFreeMoeConfig(**{**TINY, "first_k_dense_replace": 2})).save_pretrained(
        out_dir / "model_two_dense_layers"
    )
    return run_on_two_ranks(Path(__file__).parent / "distributed_scenarios.py", out_dir, timeout=540)


@pytest.fixture(scope="module")
def single_process_step():
    """Loads, biases and loss of one process routing the whole global batch."""
    model = make_model()
    balancer = LossFreeBalancer(model)
    input_ids, attention_mask = global_batch()
    loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss
    loss.backward()
    loads = balancer.loads
    balancer.step()
    return SingleProcessStep(loads, balancer.biases(), loss.item())


@pytest.fixture(scope="module")
def single_process_trainer(tmp_path_factory):
    """Biases and logged losses of a Trainer run routing both ranks' rows in one process."""
    examples = padded_examples(4 * TRAINER_STEPS, seed=7)
    trainer = make_trainer(
        make_model(),
        tmp_path_factory.mktemp("trainer"),
        examples,
        per_device_train_batch_size=4,
        max_steps=TRAINER_STEPS,
        logging_steps=1,
    )
    callback = add_balancing_callback(trainer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return callback.balancer.biases(), losses


def test_parallel_plans_are_those_of_glm4_moe():
    """transformers' GLM-4.5 MoE has the same module layout, so `DistributedConfig` shards both models alike."""
    for plan in ("base_model_tp_plan", "base_model_ep_plan", "base_model_pp_plan", "base_model_fsdp_plan"):
        assert getattr(LossFreeMoeConfig, plan) == getattr(Glm4MoeConfig, plan), plan
    for plan in ("_tp_plan", "_pp_plan", "_fsdp_plan"):
        assert getattr(LossFreeMoeForCausalLM, plan) == getattr(Glm4MoeForCausalLM, plan), plan


def test_every_parallel_plan_rule_names_a_module_or_parameter(tiny_config):
    model = LossFreeMoeForCausalLM(tiny_config())
    names = {name for name, _ in (*model.model.named_modules(), *model.model.named_parameters())}
    wildcard_names = {".".join("*" if part.isdigit() else part for part in name.split(".")) for name in names}
    for plan in ("base_model_tp_plan", "base_model_ep_plan", "base_model_fsdp_plan", "base_model_pp_plan"):
        assert set(getattr(model.config, plan)) <= wildcard_names, plan


def test_half_batches_on_two_ranks_update_like_one_process(ranks, single_process_step):
    local = [torch.tensor(rank["half_batch_ddp"]["local_loads"]) for rank in ranks]
    # each rank kept its own counts under DDP's buffer broadcast ...
    assert local[0].sum(dim=-1).tolist() == [TOP_K * (LENGTHS[0] + LENGTHS[1])] * 2
    assert local[1].sum(dim=-1).tolist() == [TOP_K * (LENGTHS[2] + LENGTHS[3])] * 2
    assert torch.equal(local[0] + local[1], single_process_step.loads)
    # ... and step() summed them: both ranks hold the single-process biases
    for rank in ranks:
        assert torch.equal(torch.tensor(rank["half_batch_ddp"]["biases"]), single_process_step.biases)


def test_trainer_with_ddp_keeps_biases_identical_across_ranks(ranks):
    first, second = (rank["trainer_ddp"] for rank in ranks)
    assert first["wrapper"] == second["wrapper"] == "DistributedDataParallel"
    assert first["local_tokens"] != second["local_tokens"]  # the ranks routed different data ...
    assert first["maxvio_batch"] == second["maxvio_batch"]  # ... but logged the MaxVio of the global step
    assert len(first["maxvio_batch"]) == 3
    assert first["biases"] == second["biases"]
    assert torch.tensor(first["biases"]).abs().max() > 0


def test_fsdp2_sharded_model_keeps_biases_identical_across_ranks(ranks, single_process_step):
    first, second = (rank["fsdp2"] for rank in ranks)
    assert first["sharded"] == "DTensor"
    assert first["biases"] == second["biases"]
    assert torch.equal(torch.tensor(first["biases"][0]), single_process_step.biases)
    assert first["biases"][-1] != first["biases"][0]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_counts_the_global_batch_once_and_steps_like_one_process(ranks, single_process_step, layout):
    reference = single_process_step
    results = [rank["layouts"][layout] for rank in ranks]
    assert reference.loads.sum(dim=-1).tolist() == [TOP_K * sum(LENGTHS)] * 2
    for result in results:
        assert result["group_size"] == (2 if layout in DATA_PARALLEL_LAYOUTS else 1)
        assert torch.equal(torch.tensor(result["loads"]), reference.loads)
        torch.testing.assert_close(torch.tensor(result["biases"]), reference.biases)
    losses = [result["loss"] for result in results]
    if layout in DATA_PARALLEL_LAYOUTS:  # each rank averages over its half: the same number of labels on both
        losses = [sum(losses) / 2]
    for loss in losses:
        assert loss == pytest.approx(reference.loss, abs=1e-5)


def test_an_explicit_process_group_overrides_the_choice(ranks, single_process_step):
    """Summed over the whole world, the two tensor-parallel ranks count every token twice."""
    for rank in ranks:
        assert torch.equal(
            torch.tensor(rank["layouts"]["tp"]["loads_summed_over_world"]), 2 * single_process_step.loads
        )


def test_each_pipeline_stage_measures_and_updates_its_own_routers(ranks, single_process_step):
    """Stage 0 holds MoE layer 1, stage 1 layer 2; each reads back the single-process loads of its layer."""
    for stage, rank in enumerate(ranks):
        result = rank["pipeline"]
        assert result["layers"] == [stage + 1]
        assert torch.equal(torch.tensor(result["loads"]), single_process_step.loads[stage : stage + 1])
        torch.testing.assert_close(torch.tensor(result["biases"]), single_process_step.biases[stage : stage + 1])
        # gathered from both stages, the loads of the whole model give its MaxVio
        assert result["model_maxvio"] == pytest.approx(compute_maxvio(single_process_step.loads).mean)


def test_a_pipeline_stage_without_router_is_refused_on_every_rank(ranks):
    """Layers 0 and 1 dense on stage 0, MoE layer 2 on stage 1: both ranks raise instead of one waiting forever."""
    for rank in ranks:
        assert "stage(s) at rank(s) [0]" in rank["pipeline_stage_without_router"]


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="transformers' pipeline parallelism is forward-only: its pipeline_parallel_naive_forward returns logits "
    "without a loss, and no gradient crosses the stages",
)
def test_pipeline_parallel_forward_returns_a_loss(ranks):
    assert all(rank["pipeline"]["loss"] is not None for rank in ranks)


@pytest.fixture(scope="module")
def single_process_logits():
    model = make_model().eval()
    input_ids, attention_mask = global_batch()
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


EXPERTS_CASES = [
    "eager/all_reduce",
    "eager/all_to_all",
    "sorted_mm/all_reduce",
    "sorted_mm/all_to_all",
    "grouped_mm/all_reduce",
    "grouped_mm/all_to_all",
]


@pytest.mark.parametrize("case", EXPERTS_CASES)
def test_expert_parallel_forward_matches_one_process(ranks, single_process_logits, case):
    """Experts split over `tp_size=ep_size=2` compute what one process does, with each kernel and token dispatch.

    `all_reduce` hands every rank the whole batch with the routes to the other rank's experts masked (expert id
    `num_local_experts`, weight 0); `all_to_all` sends each rank only its experts' tokens.
    """
    for rank in ranks:
        result = rank["experts_kernels"][case]
        assert "error" not in result, result.get("error")
        torch.testing.assert_close(torch.tensor(result["logits"]), single_process_logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", ["fsdp", "ep_fsdp"])
def test_trainer_on_a_sharded_model_matches_one_process(ranks, single_process_trainer, layout):
    biases, losses = single_process_trainer
    first, second = (rank["trainer_layouts"][layout] for rank in ranks)
    assert first["biases"] == second["biases"]
    torch.testing.assert_close(torch.tensor(first["biases"]), biases)
    assert torch.tensor(first["biases"]).abs().max() > 0
    assert first["loss"] == pytest.approx(losses, abs=1e-4)


ACCELERATE_REFUSES_TP_ON_CPU = (
    "ParallelismConfig is only compatible DistributedType.FSDP (version 2) or DistributedType.Multi{Device} or "
    "DistributedType.DEEPSPEED, but got DistributedType.MULTI_CPU."
)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=f"Accelerate: {ACCELERATE_REFUSES_TP_ON_CPU}")
def test_trainer_on_a_tensor_parallel_model_trains_on_cpu(ranks):
    refusals = [rank["trainer_tp_refusal"] for rank in ranks]
    for refusal in refusals:
        if refusal not in (None, ACCELERATE_REFUSES_TP_ON_CPU):
            raise RuntimeError(f"Not the limit this test documents: {refusal}")
    assert refusals == [None, None]
