"""Time and memory of Quantile Balancing's per-step statistics at a given scale, without a model.

For one router call it times what the balancer adds to the router's forward: the expert counts every rule needs, and
for `bias_update_rule="quantile"` the scores read from `router_logits` plus the candidate bias (`quantile_candidate`);
the router's own forward (logits, sigmoid, top-K) is timed alongside for scale. The per-step figures multiply by the
number of MoE layers. With `batch_balance_iterations` I it times the I passes of the threshold a batch-balanced router
adds to its training forward (`share_threshold_bias`). It also times the update at the end of a step, every layer at once: the sign rule's and annealed
Quantile Balancing's. Memory: what the balancer keeps between router calls, and the largest transient tensors.
The global solver (`bias_quantile_solver="global_histogram"`) is timed beside the per-call one: its per-call histogram
(`quantile_histogram`, added to the step's) and, at the end of the step, the thresholds of every layer read off the
summed histograms (`histogram_thresholds`); with the memory its histograms keep and the size of the step's collective.

    python scripts/quantile_cost.py                        # DeepSeek-V3: 256 experts, top-8, 58 MoE layers, 4096 tokens
    python scripts/quantile_cost.py --tokens 16384 --device cuda
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from hf_lossfree_moe.bias_update import histogram_thresholds
from hf_lossfree_moe.quantile_threshold import share_threshold_bias
from hf_lossfree_moe.update_rules import quantile_candidate, quantile_histogram, quantile_weight, rule_update


def median_seconds(function, repeats: int, device: str) -> float:
    """Median wall time of `function()` over `repeats` calls, after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--top_k", type=int, default=8)
    parser.add_argument("--layers", type=int, default=58)
    parser.add_argument("--tokens", type=int, default=4096, help="Tokens of one micro-batch.")
    parser.add_argument("--hidden_size", type=int, default=7168)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--batch_balance_iterations", type=int, default=4, help="Passes of batch-balanced routing to time."
    )
    parser.add_argument("--histogram_bins", type=int, default=1000, help="bias_quantile_histogram_bins")
    parser.add_argument("--histogram_range", type=float, default=1.0, help="bias_quantile_histogram_range")
    args = parser.parse_args(argv)
    for name in (
        "batch_balance_iterations",
        "experts",
        "top_k",
        "layers",
        "tokens",
        "hidden_size",
        "repeats",
        "threads",
        "histogram_bins",
    ):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.top_k >= args.experts:
        raise ValueError(f"--top_k must be below --experts={args.experts}, got {args.top_k}.")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    generator = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden_size, device=device, dtype=torch.bfloat16, generator=generator)
    weight = torch.randn(args.experts, args.hidden_size, device=device, dtype=torch.bfloat16, generator=generator)
    weight = weight * args.hidden_size**-0.5
    bias = torch.zeros(args.experts, device=device)
    logits = F.linear(hidden.float(), weight.float())  # (T, E)
    topk_indices = (logits.sigmoid() + bias).topk(args.top_k, dim=-1).indices  # (T, K)
    counts = torch.zeros(args.experts, dtype=torch.int64, device=device)
    ones = torch.ones(topk_indices.numel(), dtype=torch.int64, device=device)

    def router_forward():
        scores = F.linear(hidden.float(), weight.float()).sigmoid()
        return (scores + bias).topk(args.top_k, dim=-1).indices

    def count():
        counts.index_add_(0, topk_indices.reshape(-1), ones)

    def quantile_statistics():
        return quantile_candidate(logits.float().sigmoid(), bias, args.top_k)

    step_histogram = torch.zeros(args.experts, args.histogram_bins + 2, dtype=torch.int32, device=device)

    def global_statistics():
        scores = logits.float().sigmoid()
        step_histogram.add_(quantile_histogram(scores, bias, args.top_k, args.histogram_bins, args.histogram_range))

    def batch_balanced_bias():
        return share_threshold_bias(logits.float().sigmoid(), bias, args.top_k, passes=args.batch_balance_iterations)

    # The update at the end of a step, on the CPU as the balancer applies it: (layers, experts) loads and biases.
    step_loads = torch.randint(0, 2 * args.tokens * args.top_k // args.experts, (args.layers, args.experts))
    step_biases = torch.zeros(args.layers, args.experts, dtype=torch.float64)
    step_candidates = torch.randn(
        args.layers, args.experts, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )

    # What the step's one collective returns for the global solver: every layer's histogram and expert choices, fp64.
    one_layer = torch.cat([step_histogram.reshape(-1).double(), torch.tensor([args.tokens * args.top_k * 1.0])])
    step_histograms = one_layer.expand(args.layers, -1).clone()  # (layers, E * (bins + 2) + 1)

    def global_thresholds():
        return histogram_thresholds(step_histograms, args.experts, args.histogram_range)

    def sign_update():
        return rule_update("sign", step_loads, step_biases, 1e-3)

    def annealed_quantile_update():
        weight = quantile_weight(1000, 0.01, anneal_steps=100)
        return rule_update("quantile", step_loads, step_biases, weight, candidates=step_candidates)

    router = median_seconds(router_forward, args.repeats, args.device)
    counting = median_seconds(count, args.repeats, args.device)
    quantile = median_seconds(quantile_statistics, args.repeats, args.device)
    batch_balance = median_seconds(batch_balanced_bias, args.repeats, args.device)
    global_call = median_seconds(global_statistics, args.repeats, args.device)
    global_step = median_seconds(global_thresholds, args.repeats, "cpu")
    sign_step = median_seconds(sign_update, args.repeats, "cpu")
    quantile_step = median_seconds(annealed_quantile_update, args.repeats, "cpu")
    kept_bytes = args.layers * (args.experts * (8 + 4) + 8)  # int64 counts, fp32 candidate sum, one call count
    transient_bytes = 4 * args.tokens * args.experts * 4  # scores, biased scores, scores - cutoff and its transpose
    print(
        f"{args.layers} layers x {args.experts} experts, top-{args.top_k}, {args.tokens} tokens per micro-batch, "
        f"hidden {args.hidden_size}, {args.device} with {args.threads} thread(s), median of {args.repeats}"
    )
    print(f"router forward (bf16 weights, fp32 logits): {router * 1e3:8.2f} ms per call")
    print(f"counting (every rule):                      {counting * 1e3:8.2f} ms per call")
    print(f"quantile statistics:                        {quantile * 1e3:8.2f} ms per call")
    print(
        f"batch-balanced routing, {args.batch_balance_iterations} passes (training forwards): "
        f"{batch_balance * 1e3:8.2f} ms per call, {batch_balance * args.layers * 1e3:.1f} ms per micro-batch"
    )
    print(
        f"per micro-batch over {args.layers} layers: counting {counting * args.layers * 1e3:.1f} ms, quantile "
        f"statistics {quantile * args.layers * 1e3:.1f} ms (router forwards {router * args.layers * 1e3:.1f} ms)"
    )
    print(
        f"update at the end of a step, all {args.layers} layers on the CPU: sign rule {sign_step * 1e3:.3f} ms, "
        f"annealed Quantile Balancing {quantile_step * 1e3:.3f} ms"
    )
    print(
        f"memory kept between router calls: {kept_bytes / 2**10:.0f} KiB; largest transient tensors per call: "
        f"{transient_bytes / 2**20:.1f} MiB, freed before the next layer"
    )
    histogram_bytes = args.layers * args.experts * (args.histogram_bins + 2) * 4  # int32, one histogram per layer
    collective_values = args.layers * (args.experts + 1 + args.experts * (args.histogram_bins + 2) + 1)
    print(
        f"global solver, {args.histogram_bins} bins over +-{args.histogram_range:g} (width "
        f"{2 * args.histogram_range / args.histogram_bins:g}): histogram {global_call * 1e3:8.2f} ms per call, "
        f"{global_call * args.layers * 1e3:.1f} ms per micro-batch; thresholds of all {args.layers} layers at the end "
        f"of a step {global_step * 1e3:.1f} ms"
    )
    print(
        f"global solver memory kept between router calls: {histogram_bytes / 2**20:.1f} MiB of histograms; the step's "
        f"collective: {collective_values} fp64 values, {collective_values * 8 / 2**20:.1f} MiB"
    )
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        quantile_statistics()
        print(f"CUDA peak memory of one quantile call: {(torch.cuda.max_memory_allocated() - base) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
