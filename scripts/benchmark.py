#!/usr/bin/env python
"""Speed of LossFreeMoe against transformers' Glm4Moe of the same shape and the dense model of the same active size.

Every contender is timed side by side in one process, round-robin after a warm-up, and reported as medians (ratios
as medians of the per-round ratios, which a busy moment of a shared machine moves less):
a training step (forward, backward, fused AdamW, and `LossFreeBalancer.step()` for LossFreeMoe), an inference
forward, and greedy decoding with a KV cache. Glm4Moe is transformers' own sigmoid-routed MoE with
`e_score_correction_bias` (the same routing as ours); the dense twin is a Llama whose FFN is as wide as the active
experts, (top-K + shared) x expert FFN, the arithmetic a token really pays for. The script also reports the memory
a training step needs, the cost of balancing (`loss_free` with the balancer vs. `none` without) and the time of one
`balancer.step()` over 27 layers of 64 experts.

    python scripts/benchmark.py                                 # the default shape, on CPU
    python scripts/benchmark.py --device cuda --dtype bfloat16  # the same on a GPU
    python scripts/benchmark.py --quick --output_json /tmp/bench.json  # a tiny smoke run
"""

import argparse
import ctypes
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import Glm4MoeConfig, Glm4MoeForCausalLM, HfArgumentParser, LlamaConfig, LlamaForCausalLM
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from hf_lossfree_moe import LossFreeBalancer, LossFreeMoeConfig, LossFreeMoeForCausalLM


DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Overrides of --quick: a shape that runs in seconds, for smoke tests; the numbers mean nothing.
QUICK = {
    "vocab_size": 256,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "batch_size": 2,
    "seq_len": 32,
    "rounds": 1,
    "warmup": 1,
    "decode_prompt_len": 4,
    "decode_new_tokens": 4,
    "balancer_repeats": 3,
}


@dataclass
class BenchmarkArguments:
    vocab_size: int = field(default=4096, metadata={"help": "Vocabulary size."})
    hidden_size: int = field(default=256, metadata={"help": "Width of the residual stream."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Decoder layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads (as many key/value heads)."})
    n_routed_experts: int = field(default=64, metadata={"help": "Routed experts per MoE layer."})
    num_experts_per_tok: int = field(default=6, metadata={"help": "Routed experts per token, K."})
    n_shared_experts: int = field(default=1, metadata={"help": "Shared experts per MoE layer."})
    moe_intermediate_size: int = field(default=128, metadata={"help": "Hidden width of one expert's FFN."})
    first_k_dense_replace: int = field(default=0, metadata={"help": "Leading layers with a dense FFN."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per training step and inference forward."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per sequence."})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, or auto (cuda when available)."})
    dtype: str = field(
        default="auto", metadata={"help": "float32, bfloat16, or auto (bfloat16 on cuda, float32 on cpu)."}
    )
    threads: int | None = field(default=None, metadata={"help": "CPU intra-op threads; default: torch's choice."})
    rounds: int = field(default=9, metadata={"help": "Timed rounds; every round times every contender once."})
    warmup: int = field(default=2, metadata={"help": "Untimed calls per contender before the timed rounds."})
    implementations: str = field(
        default="sorted_mm,grouped_mm,eager",
        metadata={
            "help": "Comma-separated experts implementations of LossFreeMoe to time; the first also runs without "
            "balancing. batched_mm is left out by default: it gathers a weight matrix per token and expert, "
            "gigabytes per layer at the default shape."
        },
    )
    glm_implementations: str = field(
        default="grouped_mm,eager", metadata={"help": "Comma-separated experts implementations of Glm4Moe."}
    )
    decode_batch_size: int = field(default=1, metadata={"help": "Sequences decoded together."})
    decode_prompt_len: int = field(default=32, metadata={"help": "Prompt tokens before greedy decoding."})
    decode_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per decode call."})
    balancer_layers: int = field(default=27, metadata={"help": "Routers of the model `balancer.step()` is timed on."})
    balancer_experts: int = field(default=64, metadata={"help": "Experts per router of that model."})
    balancer_repeats: int = field(default=50, metadata={"help": "Timed `balancer.step()` calls (median)."})
    quick: bool = field(default=False, metadata={"help": "Tiny shape, one round: checks the script, not the speed."})
    output_json: str | None = field(
        default=None, metadata={"help": "Also write every number to this JSON file. Default: only print the table."}
    )

    def __post_init__(self):
        if self.quick:
            for name, value in QUICK.items():
                setattr(self, name, value)
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}.")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was requested, but torch sees no CUDA device.")
        if self.dtype == "auto":
            self.dtype = "bfloat16" if self.device == "cuda" else "float32"
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {('auto', *DTYPES)}, got {self.dtype!r}.")
        for name in ("rounds", "batch_size", "seq_len", "decode_batch_size", "decode_new_tokens", "balancer_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}.")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}.")
        _implementation_list(self.implementations, "implementations")
        _implementation_list(self.glm_implementations, "glm_implementations")

    @property
    def lossfree_implementations(self) -> list[str]:
        return _implementation_list(self.implementations, "implementations")

    @property
    def glm4_moe_implementations(self) -> list[str]:
        return _implementation_list(self.glm_implementations, "glm_implementations")


def _implementation_list(names: str, argument: str) -> list[str]:
    names = [name.strip() for name in names.split(",") if name.strip()]
    allowed = ["eager", *ALL_EXPERTS_FUNCTIONS.keys()]
    unknown = [name for name in names if name not in allowed]
    if not names or unknown:
        raise ValueError(f"{argument} must be a comma-separated subset of {allowed}, got {names}.")
    return names


@dataclass
class Contender:
    """One model under test, with its optimizer (the Trainer's default, fused AdamW) and LossFreeMoe's balancer."""

    name: str
    family: str
    model: torch.nn.Module
    balancer: LossFreeBalancer | None = None
    optimizer: torch.optim.Optimizer = field(init=False)

    def __post_init__(self):
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)


def moe_shape(args: BenchmarkArguments) -> dict:
    """The config fields LossFreeMoe and Glm4Moe share: one shape for both."""
    return {
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": dense_twin_width(args),
        "moe_intermediate_size": args.moe_intermediate_size,
        "num_hidden_layers": args.num_hidden_layers,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_attention_heads,
        "max_position_embeddings": max_positions(args),
        "n_routed_experts": args.n_routed_experts,
        "n_shared_experts": args.n_shared_experts,
        "num_experts_per_tok": args.num_experts_per_tok,
        "first_k_dense_replace": args.first_k_dense_replace,
    }


def lossfree_config(args: BenchmarkArguments, load_balancing: str) -> LossFreeMoeConfig:
    return LossFreeMoeConfig(**moe_shape(args), load_balancing=load_balancing)


def glm4_moe_config(args: BenchmarkArguments) -> Glm4MoeConfig:
    """Glm4Moe routed like ours (sigmoid, un-normalised gates, scale 1); full rotary, no multi-token head."""
    return Glm4MoeConfig(
        **moe_shape(args),
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        num_mtp_layers=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
    )


def max_positions(args: BenchmarkArguments) -> int:
    return max(args.seq_len, args.decode_prompt_len + args.decode_new_tokens)


def dense_twin_width(args: BenchmarkArguments) -> int:
    """FFN width with the active experts' arithmetic: (top-K + shared) x expert FFN."""
    return (args.num_experts_per_tok + args.n_shared_experts) * args.moe_intermediate_size


def build_contenders(args: BenchmarkArguments) -> list[Contender]:
    def build(model_class, config, implementation=None):
        torch.manual_seed(0)  # the same initial weights, hence the same routing, in every run
        model = model_class._from_config(config, experts_implementation=implementation)
        return model.to(device=args.device, dtype=DTYPES[args.dtype])

    contenders = []
    for implementation in args.lossfree_implementations:
        model = build(LossFreeMoeForCausalLM, lossfree_config(args, "loss_free"), implementation)
        contenders.append(Contender(f"LossFreeMoe {implementation}", "ours", model, LossFreeBalancer(model)))
    first = args.lossfree_implementations[0]
    model = build(LossFreeMoeForCausalLM, lossfree_config(args, "none"), first)
    contenders.append(Contender(f"LossFreeMoe {first}, no balancing", "ours_unbalanced", model))
    for implementation in args.glm4_moe_implementations:
        model = build(Glm4MoeForCausalLM, glm4_moe_config(args), implementation)
        contenders.append(Contender(f"Glm4Moe {implementation}", "glm4_moe", model))
    llama = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=dense_twin_width(args),
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_attention_heads,
        max_position_embeddings=max_positions(args),
    )
    contenders.append(
        Contender(f"Llama dense twin (FFN {dense_twin_width(args)})", "dense", build(LlamaForCausalLM, llama))
    )
    return contenders


def synchronize(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def update_weights(contender: Contender, input_ids: torch.Tensor):
    """Forward, backward and AdamW: a training step up to `balancer.step()`."""
    contender.model.train()
    contender.model(input_ids=input_ids, labels=input_ids).loss.backward()
    contender.optimizer.step()
    contender.optimizer.zero_grad(set_to_none=True)


def training_step(contender: Contender, input_ids: torch.Tensor) -> Callable[[], None]:
    def step():
        update_weights(contender, input_ids)
        if contender.balancer is not None:
            contender.balancer.step()

    return step


def inference_forward(contender: Contender, input_ids: torch.Tensor) -> Callable[[], None]:
    def forward():
        contender.model.eval()
        with torch.inference_mode():
            contender.model(input_ids=input_ids, use_cache=False)

    return forward


def greedy_decode(contender: Contender, prompt: torch.Tensor, new_tokens: int) -> Callable[[], None]:
    def decode():
        contender.model.eval()
        with torch.inference_mode():
            contender.model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )

    return decode


def interleaved_medians(
    calls: dict[str, Callable[[], None]], args: BenchmarkArguments
) -> dict[str, dict[str, float | list[float]]]:
    """Median seconds per call: warm-up, then rounds that each time every call once, starting at a rotating one."""
    for call in calls.values():
        for _ in range(args.warmup):
            call()
    synchronize(args.device)
    names = list(calls)
    samples = {name: [] for name in names}
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            calls[name]()
            synchronize(args.device)
            samples[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(times), "samples_s": times} for name, times in samples.items()}


def _rss_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} missing from /proc/self/status")


def step_peak_memory_mb(step: Callable[[], None], device: str) -> float | None:
    """Memory one training step needs beyond what the model and optimizer state already hold, in MiB.

    CUDA: peak allocated minus allocated before the step. CPU (Linux): peak resident set minus the resident set
    before, after handing cached free memory back to the OS and resetting the peak; None elsewhere.
    """
    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set, to VmRSS
        before = _rss_kib("VmRSS")
    except OSError:
        return None
    step()
    return (_rss_kib("VmHWM") - before) / 2**10


class _HookTimer:
    """Accumulates the time between `start` and `stop`, registered as hooks around the balancer's own hooks."""

    def __init__(self):
        self.total_s = 0.0
        self._started = 0.0

    def start(self, *_):
        self._started = time.perf_counter()

    def stop(self, *_):
        self.total_s += time.perf_counter() - self._started


def balancing_work_s(contender: Contender, input_ids: torch.Tensor, args: BenchmarkArguments) -> float:
    """Median seconds per training step spent in the balancer itself, timed directly: its hooks (the model's mask
    capture and release, each router's token count; host time) plus `balancer.step()`.

    Marker hooks registered first (`prepend=True`) and last around the balancer's hooks time its work (and that of
    hooks registered after it: none here), free of the run-to-run noise that comparing two whole steps carries.
    """
    model, balancer = contender.model, contender.balancer
    timer = _HookTimer()
    handles = []
    for module in (model, *balancer.routers):
        handles += [module.register_forward_hook(timer.start, prepend=True), module.register_forward_hook(timer.stop)]
    handles += [
        model.register_forward_pre_hook(timer.start, prepend=True),
        model.register_forward_pre_hook(timer.stop),
    ]
    samples = []
    try:
        for _ in range(args.rounds):
            timer.total_s = 0.0
            update_weights(contender, input_ids)
            synchronize(args.device)
            start = time.perf_counter()
            balancer.step()
            synchronize(args.device)
            samples.append(timer.total_s + time.perf_counter() - start)
    finally:
        for handle in handles:
            handle.remove()
    return statistics.median(samples)


def time_balancer_step(args: BenchmarkArguments) -> float:
    """Median seconds of `balancer.step()` on a model of `balancer_layers` routers of `balancer_experts` experts."""
    config = LossFreeMoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=8,
        num_hidden_layers=args.balancer_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_routed_experts=args.balancer_experts,
        n_shared_experts=1,
        num_experts_per_tok=min(6, args.balancer_experts),
        first_k_dense_replace=0,
    )
    torch.manual_seed(0)
    model = LossFreeMoeForCausalLM(config).to(args.device).train()
    balancer = LossFreeBalancer(model)
    input_ids = torch.randint(0, config.vocab_size, (2, 16), device=args.device)
    times = []
    for _ in range(args.balancer_repeats + 1):
        with torch.no_grad():
            model(input_ids=input_ids)  # counts the loads that step() consumes
        synchronize(args.device)
        start = time.perf_counter()
        balancer.step()
        synchronize(args.device)
        times.append(time.perf_counter() - start)
    balancer.remove()
    return statistics.median(times[1:])


def environment(args: BenchmarkArguments) -> dict[str, str | int]:
    if args.device == "cuda":
        hardware = torch.cuda.get_device_name()
    else:
        hardware = next(
            (line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")),
            platform.processor() or platform.machine(),
        )
    return {
        "hardware": hardware,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _cpuinfo() -> list[str]:
    path = Path("/proc/cpuinfo")
    return path.read_text().splitlines() if path.exists() else []


def run(args: BenchmarkArguments) -> dict:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    contenders = build_contenders(args)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), generator=generator)
    prompt = torch.randint(0, args.vocab_size, (args.decode_batch_size, args.decode_prompt_len), generator=generator)
    input_ids, prompt = input_ids.to(args.device), prompt.to(args.device)

    train = interleaved_medians({c.name: training_step(c, input_ids) for c in contenders}, args)
    forward = interleaved_medians({c.name: inference_forward(c, input_ids) for c in contenders}, args)
    decode = interleaved_medians({c.name: greedy_decode(c, prompt, args.decode_new_tokens) for c in contenders}, args)
    new_tokens = args.decode_batch_size * args.decode_new_tokens

    results = {}
    for contender in contenders:
        name = contender.name
        results[name] = {
            "family": contender.family,
            "parameters": sum(p.numel() for p in contender.model.parameters()),
            "train_step_ms": 1e3 * train[name]["median_s"],
            "forward_ms": 1e3 * forward[name]["median_s"],
            "decode_tokens_per_s": new_tokens / decode[name]["median_s"],
            "train_step_peak_mb": step_peak_memory_mb(training_step(contender, input_ids), args.device),
            "train_step_samples_ms": [1e3 * t for t in train[name]["samples_s"]],
            "forward_samples_ms": [1e3 * t for t in forward[name]["samples_s"]],
            "decode_samples_ms": [1e3 * t for t in decode[name]["samples_s"]],
        }
    add_ratios(results)
    balanced, unbalanced = (
        f"LossFreeMoe {args.lossfree_implementations[0]}{suffix}" for suffix in ("", ", no balancing")
    )
    work_s = balancing_work_s(next(c for c in contenders if c.name == balanced), input_ids, args)
    balancing = {
        "overhead_pct": paired_overhead_pct(train[balanced]["samples_s"], train[unbalanced]["samples_s"]),
        "work_ms": 1e3 * work_s,
        "work_pct": 100 * work_s / train[balanced]["median_s"],
        "balancer_step_ms": 1e3 * time_balancer_step(args),
        "balancer_step_layers": args.balancer_layers,
        "balancer_step_experts": args.balancer_experts,
    }
    config = {key: value for key, value in asdict(args).items() if key != "output_json"}
    return {"config": config, "environment": environment(args), "results": results, "balancing": balancing}


# Each reported metric, the per-round samples it is computed from, and whether higher is better.
METRICS = {
    "train_step_ms": ("train_step_samples_ms", False),
    "forward_ms": ("forward_samples_ms", False),
    "decode_tokens_per_s": ("decode_samples_ms", True),
}


def per_round_ratios(samples: list[float], reference: list[float], higher_is_better: bool = False) -> list[float]:
    """Each round's ratio to the reference timed in the same round (for a rate: reference time / time).

    The two timings of a round share the machine's load at that moment, so a slow round on a shared machine moves
    both, and the ratio of the pair stays put where a ratio of two separate medians would not.
    """
    return [b / a if higher_is_better else a / b for a, b in zip(samples, reference, strict=True)]


def paired_overhead_pct(with_balancing: list[float], without: list[float]) -> float:
    """Median over rounds of the extra time, in %: both runs of a round see the same machine load."""
    return 100 * (statistics.median(per_round_ratios(with_balancing, without)) - 1)


def add_ratios(results: dict[str, dict]):
    """Ratios to Glm4Moe's best implementation and to the dense twin (< 1 is faster for times, > 1 for tokens/s).

    Each is the median of the per-round ratios, with their lowest and highest round in `..._range`; the Glm4Moe
    reference of a metric is the implementation with the best median for it, so another Glm4Moe implementation can
    still show a median ratio a little below 1 against it.
    """
    glm = [r for r in results.values() if r["family"] == "glm4_moe"]
    dense = [r for r in results.values() if r["family"] == "dense"]
    for metric, (samples_key, higher_is_better) in METRICS.items():
        best = max if higher_is_better else min
        references = {
            "glm4_moe_best": best(glm, key=lambda r: r[metric]) if glm else None,
            "dense": dense[0] if dense else None,
        }
        for result in results.values():
            for label, reference in references.items():
                ratios = (
                    per_round_ratios(result[samples_key], reference[samples_key], higher_is_better)
                    if reference
                    else None
                )
                result[f"{metric}_vs_{label}"] = statistics.median(ratios) if ratios else None
                result[f"{metric}_vs_{label}_range"] = [min(ratios), max(ratios)] if ratios else None


def format_table(report: dict) -> str:
    env, config = report["environment"], report["config"]
    header = (
        f"{config['device']}, {config['dtype']}, {env['hardware']}, {env['cpu_threads']} CPU threads, "
        f"torch {env['torch']}, transformers {env['transformers']}; medians of {config['rounds']} interleaved rounds; "
        f"ratios: medians of per-round ratios\n"
        f"shape: {config['num_hidden_layers']} layers, hidden {config['hidden_size']}, {config['n_routed_experts']} "
        f"experts top-{config['num_experts_per_tok']} + {config['n_shared_experts']} shared, expert FFN "
        f"{config['moe_intermediate_size']}, batch {config['batch_size']}x{config['seq_len']}, vocab "
        f"{config['vocab_size']}\n"
    )
    columns = [
        ("model", 40, lambda r, name: name),
        ("train step ms", 13, lambda r, name: f"{r['train_step_ms']:.1f}"),
        ("x Glm4Moe", 9, lambda r, name: _ratio(r["train_step_ms_vs_glm4_moe_best"])),
        ("x dense", 7, lambda r, name: _ratio(r["train_step_ms_vs_dense"])),
        ("forward ms", 10, lambda r, name: f"{r['forward_ms']:.1f}"),
        ("x Glm4Moe", 9, lambda r, name: _ratio(r["forward_ms_vs_glm4_moe_best"])),
        ("decode tok/s", 12, lambda r, name: f"{r['decode_tokens_per_s']:.1f}"),
        ("x Glm4Moe", 9, lambda r, name: _ratio(r["decode_tokens_per_s_vs_glm4_moe_best"])),
        (
            "step peak MB",
            12,
            lambda r, name: "n/a" if r["train_step_peak_mb"] is None else f"{r['train_step_peak_mb']:.0f}",
        ),
    ]
    lines = [" | ".join(title.ljust(width) for title, width, _ in columns)]
    lines.append("-|-".join("-" * width for _, width, _ in columns))
    for name, result in report["results"].items():
        lines.append(" | ".join(cell(result, name).ljust(width) for _, width, cell in columns))
    balancing = report["balancing"]
    spread_name, spread = next(iter(report["results"].items()))
    footer = (
        f"\nx Glm4Moe: ratio to Glm4Moe's best implementation (times: lower is better; tokens/s: higher is better)."
        f"\ntraining-step ratios of {spread_name}, lowest and highest round: "
        f"x Glm4Moe {_span(spread['train_step_ms_vs_glm4_moe_best_range'])}, "
        f"x dense {_span(spread['train_step_ms_vs_dense_range'])}"
        f"\nbalancing overhead (loss_free + balancer.step() vs none, median of per-round ratios): "
        f"{balancing['overhead_pct']:+.1f}% of a step"
        f"\nbalancing work timed directly (hooks + balancer.step(), median per step): {balancing['work_ms']:.2f} ms, "
        f"{balancing['work_pct']:.2f}% of a step"
        f"\nbalancer.step() on {balancing['balancer_step_experts']} experts x {balancing['balancer_step_layers']} "
        f"layers: {balancing['balancer_step_ms']:.3f} ms"
    )
    return header + "\n".join(lines) + footer


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _span(values: list[float] | None) -> str:
    return "n/a" if values is None else f"{values[0]:.2f}-{values[1]:.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser(
        BenchmarkArguments, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    report = run(args)
    print(format_table(report))
    if args.output_json is not None:
        Path(args.output_json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.output_json}")


if __name__ == "__main__":
    main(sys.argv[1:])
