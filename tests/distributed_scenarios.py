"""Runs under `torchrun --nproc_per_node 2`: each rank routes its share of the data, then writes what it ended with.

Three settings, each with rank-local counts summed by `LossFreeBalancer.step()`: a Trainer run (Accelerate wraps the
model in DDP), a plain loop over a DDP model (DDP broadcasts rank 0's buffers before every forward) and a plain loop
over a model sharded with FSDP2's `fully_shard`. Results go to `<out_dir>/rank<r>.json`.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer, TrainingArguments

from conftest import TINY
from hf_lossfree_moe import LossFreeBalancer, LossFreeMoeConfig, LossFreeMoeForCausalLM, add_balancing_callback
from test_callbacks import collate, padded_examples


LENGTHS = [12, 5, 9, 3]  # real tokens of the global batch's rows; rank r routes rows 2r and 2r + 1


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


def main(out_dir: Path):
    results = {"trainer_ddp": trainer_with_ddp(out_dir)}
    rank = dist.get_rank()  # the Trainer's Accelerate initialised the gloo process group
    results["half_batch_ddp"] = half_batch_with_ddp(rank)
    results["fsdp2"] = fsdp2(rank)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
