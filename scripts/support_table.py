#!/usr/bin/env python
"""Write docs/support_table.md, the table of transformers MoE families that `LossFreeBalancer` supports.

Every family of the installed transformers whose modeling code has an `e_score_correction_bias` is built tiny on
CPU (`build_tiny_model`), then checked the way tests/test_families.py checks it: one training forward with padding
counts exactly top-K real tokens per router, and one `step()` moves each bias by the sign rule. The table also says
where the bias lives, which adapter reads the router, whether routing is group-limited, and what dtype the bias has
after `from_pretrained(..., dtype=torch.bfloat16)`. About a minute on a laptop CPU.

    python scripts/support_table.py                                  # writes docs/support_table.md
    python scripts/support_table.py --output_file /dev/stdout
"""

import inspect
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import HfArgumentParser
from transformers.utils import logging

from hf_lossfree_moe import LossFreeBalancer
from hf_lossfree_moe.routers import find_routers
from hf_lossfree_moe.testing_utils import build_tiny_model, correction_bias_families, tiny_model_class


TOP_K = 2  # build_tiny_model routes each token to 2 of 8 experts
UPDATE_RATE = 1e-3
HEADER = (
    "| family | tiny model | router | bias | adapter | group-limited | bias after bf16 load | status |\n"
    "|---|---|---|---|---|---|---|---|"
)


@dataclass
class TableArguments:
    output_file: str = field(default="docs/support_table.md", metadata={"help": "Where to write the Markdown."})


def layer_relative(name: str) -> str:
    """`model.layers.0.mlp.gate` -> `mlp.gate`: where the module sits inside a decoder layer."""
    return re.sub(r"^.*?layers\.\d+\.", "", name)


def module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


def verify(model: torch.nn.Module) -> str:
    """'verified' when counts and the first update are exact, else what went wrong."""
    balancer = LossFreeBalancer(model, bias_update_rate=UPDATE_RATE)
    input_ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    before = balancer.biases()
    with torch.no_grad():
        model.train()(input_ids=input_ids.masked_fill(attention_mask == 0, 0), attention_mask=attention_mask)
    loads = balancer.loads  # (L, E)
    balancer.step()
    balancer.remove()
    routed = loads.sum(dim=-1) > 0  # (L,)
    if not routed.any() or set(loads[routed].sum(dim=-1).tolist()) != {TOP_K * int(attention_mask.sum())}:
        return f"counts {loads.sum(dim=-1).tolist()} != top-{TOP_K} x {int(attention_mask.sum())} real tokens"
    mean = loads.double().mean(dim=-1, keepdim=True)  # (L, 1)
    expected = torch.where(routed.unsqueeze(-1), UPDATE_RATE * torch.sign(mean - loads), 0.0).float()
    if not torch.allclose(balancer.biases() - before, expected):
        return "the bias did not follow the sign rule"
    return "verified"


def bf16_load_dtype(family: str, model: torch.nn.Module) -> str:
    with tempfile.TemporaryDirectory() as folder:
        try:
            model.save_pretrained(folder)
            loaded = tiny_model_class(family).from_pretrained(folder, dtype=torch.bfloat16)
        except Exception as error:  # the table reports the family's own save/load failure
            return f"save/load fails ({type(error).__name__})"
    dtype = {getattr(router.bias_owner, router.bias_attr).dtype for router in find_routers(loaded)}
    return "fp32" if dtype == {torch.float32} else "**bf16** (upcast by the balancer)"


def row(family: str) -> str:
    model_class = tiny_model_class(family)
    try:
        torch.manual_seed(0)
        model = build_tiny_model(family)
    except Exception as error:  # a family that cannot be built tiny on CPU is reported, not hidden
        return f"| `{family}` | `{model_class.__name__}` | | | | | | skipped: {type(error).__name__}: {error} |"
    routers = find_routers(model)
    router = routers[0]
    bias = getattr(router.bias_owner, router.bias_attr)
    storage = "`nn.Parameter`" if isinstance(bias, torch.nn.Parameter) else "buffer"
    owner = layer_relative(module_name(model, router.bias_owner))
    grouped = "yes" if "topk_group" in inspect.getsource(type(router.module)) else "no"
    status = verify(model)
    return (
        f"| `{family}` | `{model_class.__name__}` | `{layer_relative(router.name)}` | {storage} "
        f"`{owner}.{router.bias_attr}` {tuple(bias.shape)} | {router.adapter.name} | {grouped} | "
        f"{bf16_load_dtype(family, model)} | {status} |"
    )


def main():
    (args,) = HfArgumentParser(TableArguments).parse_args_into_dataclasses()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.simplefilter("ignore")  # the balancer's bf16 and requires_grad warnings are what the table reports
    rows = [row(family) for family in correction_bias_families()]
    table = "\n".join(
        [
            f"Families of transformers {transformers.__version__} with an `e_score_correction_bias`, each built "
            f"tiny (hidden 64, 8 experts, top-{TOP_K}) and checked by `scripts/support_table.py`: one training "
            "forward counts exactly top-K real tokens per router (padding excluded), one `step()` moves every bias "
            "by the sign rule. Text decoders only: vision and audio towers are not built.",
            "",
            HEADER,
            *rows,
            "",
        ]
    )
    Path(args.output_file).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output_file).write_text(table, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
