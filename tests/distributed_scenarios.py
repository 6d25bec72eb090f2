"""Runs under `torchrun --nproc_per_node 2`: each rank routes its share of the data, then writes what it ended with.

Settings without a `distributed_config`, each with rank-local counts summed by `LossFreeBalancer.step()`: a Trainer run
(Accelerate wraps the model in DDP), a plain loop over a DDP model (DDP broadcasts rank 0's buffers before every
forward) and a plain loop over a model sharded with FSDP2's `fully_shard`. Then the saved tiny model loaded with
`from_pretrained(..., distributed_config=DistributedConfig(...))` in each of transformers' layouts: one measured
forward and one training step, a Trainer run, and forwards under expert parallelism with each experts kernel.
Results go to `<out_dir>/rank<r>.json`; the models are read from `<out_dir>/model` and, with two leading dense layers,
`<out_dir>/model_two_dense_layers`.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer, TrainingArguments
from transformers.distributed import DistributedConfig

from conftest import TINY
from hf_lossfree_moe import (
    LossFreeBalancer,
    LossFreeMoeConfig,
    LossFreeMoeForCausalLM,
    add_balancing_callback,
    compute_maxvio,
)
from test_callbacks import collate, make_trainer, padded_examples


LENGTHS = [12, 5, 9, 3]  # real tokens of the global batch's rows; rank r routes rows 2r and 2r + 1
# `DistributedConfig` layouts of two processes: data-parallel ranks route different rows, tensor-parallel ones the same.
LAYOUTS = {
    "tp": dict(tp_size=2),
    "fsdp": dict(fsdp_size=2),
    "ep_tp": dict(tp_size=2, ep_size=2),
    "ep_fsdp": dict(fsdp_size=2, ep_size=2),
    "hsdp": dict(dp_replicate_size=2),
}
EXPERTS_KERNELS = ("eager", "sorted_mm", "grouped_mm")
EP_IMPLEMENTATIONS = ("all_reduce", "all_to_all")
TRAINER_STEPS = 2


def make_model() -> LossFreeMoeForCausalLM:
    torch.manual_seed(0)
    return LossFreeMoeForCausalLM(LossFreeMoeConfig(**TINY)).train()


def global_batch(step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(4, 12) right-padded input_ids and attention_mask, different for every step."""
    generator = torch.Generator().manual_seed(step)
    attention_mask = (torch.arange(12) < torch.tensor(LENGTHS)[:, None]).long()
    input_ids = torch.randint(3, 128, (4, 12), generator=generator)
    return input_ids.masked_fill(attention_mask == 0, 0), attention_mask


def rank_rows(rank: int) -> slice:
    return slice(2 * rank, 2 * rank + 2)


def trainer_with_ddp(out_dir: Path) -> dict:
    args = TrainingArguments(
        output_dir=str(out_dir / "trainer"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        logging_steps=1,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=make_model(), args=args, train_dataset=padded_examples(24, seed=7), data_collator=collate)
    callback = add_balancing_callback(trainer)
    local_tokens = []
    step = callback.balancer.step

    def recorded_step():
        local_tokens.append(callback.balancer.loads.sum().item())
        return step()

    callback.balancer.step = recorded_step
    trainer.train()
    return {
        "wrapper": type(trainer.model_wrapped).__name__,
        "biases": callback.balancer.biases().tolist(),
        "maxvio_batch": [entry["maxvio_batch"] for entry in trainer.state.log_history if "loss" in entry],
        "local_tokens": local_tokens,
    }


def half_batch_with_ddp(rank: int) -> dict:
    model = DistributedDataParallel(make_model())  # broadcast_buffers=True, the default
    balancer = LossFreeBalancer(model)
    input_ids, attention_mask = global_batch()
    rows = rank_rows(rank)
    model(input_ids=input_ids[rows], attention_mask=attention_mask[rows], labels=input_ids[rows]).loss.backward()
    local_loads = balancer.loads
    balancer.step()
    return {"local_loads": local_loads.tolist(), "biases": balancer.biases().tolist()}


def fsdp2(rank: int) -> dict:
    model = make_model()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    balancer = LossFreeBalancer(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    biases = []
    for step in range(3):
        input_ids, attention_mask = global_batch(step)
        rows = rank_rows(rank)
        model(input_ids=input_ids[rows], attention_mask=attention_mask[rows], labels=input_ids[rows]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        balancer.step()
        biases.append(balancer.biases().tolist())
    return {"sharded": type(model.model.layers[1].mlp.gate.weight).__name__, "biases": biases}


def load(model_dir: Path, layout: dict, **kwargs) -> LossFreeMoeForCausalLM:
    config = DistributedConfig(**layout)
    return LossFreeMoeForCausalLM.from_pretrained(model_dir, distributed_config=config, **kwargs).train()


def layout_rows(layout: dict, rank: int) -> slice:
    """The rows of the global batch a rank routes: its half with data parallelism, all of them otherwise."""
    return rank_rows(rank) if DistributedConfig(**layout).dp_size > 1 else slice(None)


def measured_loads(balancer: LossFreeBalancer, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list:
    with torch.no_grad(), balancer.measure() as measurement:
        balancer.model(input_ids=input_ids, attention_mask=attention_mask)
    return measurement.loads.tolist()


def measured_training_step(model_dir: Path, layout: dict, rank: int) -> dict:
    """On this rank's rows of the global batch: the loads of a measured forward, summed over the whole world and over
    the balancer's default group, then one training step and `step()`."""
    model = load(model_dir, layout)
    input_ids, attention_mask = global_batch()
    rows = layout_rows(layout, rank)
    over_world = LossFreeBalancer(model, process_group=dist.group.WORLD)
    loads_summed_over_world = measured_loads(over_world, input_ids[rows], attention_mask[rows])
    over_world.remove()
    balancer = LossFreeBalancer(model)
    loads = measured_loads(balancer, input_ids[rows], attention_mask[rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(input_ids=input_ids[rows], attention_mask=attention_mask[rows], labels=input_ids[rows]).loss
    loss.backward()
    optimizer.step()
    balancer.step()
    return {
        "loads": loads,
        "loads_summed_over_world": loads_summed_over_world,
        "loss": loss.item(),
        "biases": balancer.biases().tolist(),
        "group_size": dist.get_world_size(balancer.process_group),
    }


def pipeline(model_dir: Path) -> dict:
    """Two stages, one MoE layer each: a measured forward, then a training-mode forward and `step()`."""
    model = load(model_dir, dict(pp_size=2))
    balancer = LossFreeBalancer(model)
    input_ids, attention_mask = global_batch()
    with torch.no_grad():
        with balancer.measure() as measurement:
            model(input_ids=input_ids, attention_mask=attention_mask)
        output = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
    balancer.step()
    # The whole model's MaxVio, as docs/multi_gpu.md computes it: every stage's loads gathered by layer number.
    stages = [None] * dist.get_world_size()
    dist.all_gather_object(stages, dict(zip(balancer.layers, measurement.loads.tolist(), strict=True)))
    model_loads = {layer: loads for stage in stages for layer, loads in stage.items()}
    return {
        "layers": balancer.layers,
        "loads": measurement.loads.tolist(),
        "biases": balancer.biases().tolist(),
        "model_maxvio": compute_maxvio(list(model_loads.values()), list(model_loads)).mean,
        "loss": None if output.get("loss") is None else output.loss.item(),
    }


def pipeline_stage_without_router(model_dir: Path) -> str | None:
    """The error building a balancer raises when the first of two stages holds only dense layers."""
    model = load(model_dir, dict(pp_size=2))
    try:
        LossFreeBalancer(model)
    except ValueError as error:
        return str(error)
    return None


def trainer_run(model_dir: Path, layout: dict, out_dir: Path) -> dict:
    """`TRAINER_STEPS` optimizer steps of 2 rows per rank, the callback added."""
    trainer = make_trainer(
        load(model_dir, layout),
        out_dir,
        padded_examples(4 * TRAINER_STEPS, seed=7),
        max_steps=TRAINER_STEPS,
        logging_steps=1,
    )
    callback = add_balancing_callback(trainer)
    trainer.train()
    return {
        "biases": callback.balancer.biases().tolist(),
        "loss": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
    }


def trainer_refusal(model_dir: Path, layout: dict, out_dir: Path) -> str | None:
    """The error a Trainer run raises for this layout on CPU, or None when it trains."""
    try:
        trainer_run(model_dir, layout, out_dir)
    except ValueError as error:
        return str(error)
    return None


def experts_kernels_under_ep(model_dir: Path) -> dict:
    """Logits of the global batch under `tp_size=ep_size=2`, per experts kernel and token dispatch; errors by name."""
    input_ids, attention_mask = global_batch()
    results = {}
    for kernel in EXPERTS_KERNELS:
        for dispatch in EP_IMPLEMENTATIONS:
            layout = dict(tp_size=2, ep_size=2, ep_implementation=dispatch)
            model = load(model_dir, layout, experts_implementation=kernel).eval()
            try:
                with torch.no_grad():
                    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
                results[f"{kernel}/{dispatch}"] = {"logits": logits.tolist()}
            except Exception as error:  # reported to the test, which names the failing case
                results[f"{kernel}/{dispatch}"] = {"error": f"{type(error).__name__}: {error}"}
    return results


def main(out_dir: Path):
    results = {"trainer_ddp": trainer_with_ddp(out_dir)}
    rank = dist.get_rank()  # the Trainer's Accelerate initialised the gloo process group
    results["half_batch_ddp"] = half_batch_with_ddp(rank)
    results["fsdp2"] = fsdp2(rank)
    model_dir = out_dir / "model"
    results["layouts"] = {name: measured_training_step(model_dir, layout, rank) for name, layout in LAYOUTS.items()}
    results["pipeline"] = pipeline(model_dir)
    results["pipeline_stage_without_router"] = pipeline_stage_without_router(out_dir / "model_two_dense_layers")
    results["experts_kernels"] = experts_kernels_under_ep(model_dir)
    results["trainer_layouts"] = {
        name: trainer_run(model_dir, LAYOUTS[name], out_dir / f"trainer_{name}") for name in ("fsdp", "ep_fsdp")
    }
    # Last: Accelerate refuses this one while setting up, after the Trainer runs above have used its state.
    results["trainer_tp_refusal"] = trainer_refusal(model_dir, LAYOUTS["tp"], out_dir / "trainer_tp")
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
