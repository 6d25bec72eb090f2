"""How much Expert Choice routing can tell a token about the rest of its routing chunk, at most (the paper's RQ4).

Under Expert Choice, whether expert e of MoE layer l picks token t is a decision taken by looking at every token of
the chunk: one binary variable per (layer, expert) that the token's output depends on and that its own prefix does
not determine. A token's routing is the E binary decisions of each of the L MoE layers, so the information it can
carry about the other tokens (its own future among them) is at most L * E bits. Each expert picks a fraction
p = C / n of the n tokens, so a decision that is 1 for p of the tokens has entropy at most H(p), where
H(p) = -p log2 p - (1 - p) log2 (1 - p), and the bound tightens to

    leak <= L * E * H(p)  bits per token,  p = min(1, capacity_factor * K / E).

Assumptions, stated honestly: the bound counts all information the decisions carry, not only the part about the
token's own future; it is reached only if the model learns to encode that information in the routing and to read it
back; it does not depend on the chunk size (a whole batch leaks as many bits as a sequence, but then mostly about
other sequences, which help less). Compare it with the entropy of the next token, log2(perplexity): a bound above it
means routing can carry the answer.
"""

import math


def binary_entropy(probability: float) -> float:
    """H(p) in bits; 0 at p = 0 or 1."""
    if not 0 <= probability <= 1:
        raise ValueError(f"probability must be in [0, 1], got {probability!r}.")
    if probability in (0, 1):
        return 0.0
    return -probability * math.log2(probability) - (1 - probability) * math.log2(1 - probability)


def leakage_bound_bits(num_moe_layers: int, num_experts: int, top_k: int, capacity_factor: float) -> float:
    """`L * E * H(min(1, capacity_factor * K / E))`: bits per token that Expert Choice routing can leak, at most."""
    for name, value in (("num_moe_layers", num_moe_layers), ("num_experts", num_experts), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if not (isinstance(capacity_factor, (int, float)) and math.isfinite(capacity_factor) and capacity_factor > 0):
        raise ValueError(f"capacity_factor must be a positive number, got {capacity_factor!r}.")
    return num_moe_layers * num_experts * binary_entropy(min(1.0, capacity_factor * top_k / num_experts))
