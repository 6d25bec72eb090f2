"""MaxVio: how far the most loaded expert of a MoE layer is above the mean load (Wang et al., 2024)."""

import datasets
import evaluate
import numpy as np


_CITATION = """\
@article{wang2024auxiliary,
  title={Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts},
  author={Wang, Lean and Gao, Huazuo and Zhao, Chenggang and Sun, Xu and Dai, Damai},
  journal={arXiv preprint arXiv:2408.15664},
  year={2024}
}
"""

_DESCRIPTION = """\
MaxVio = (max_i Load_i - mean Load) / mean Load, per MoE layer, averaged over layers. Load_i is the number of tokens
routed to expert i: over one training step it gives MaxVio_batch, over a whole validation set MaxVio_global.
0 means perfectly balanced; 1 means the busiest expert does twice the average work.
"""

_KWARGS_DESCRIPTION = """
Args:
    loads (`list[list[float]]`): one row per MoE layer, the tokens each of its experts received.
Returns:
    maxvio (`float`): the mean over layers of (max load - mean load) / mean load.
    maxvio_per_layer (`list[float]`): the value of each layer, in row order.
Examples:
    >>> maxvio = evaluate.load("path/to/maxvio")
    >>> maxvio.compute(loads=[[3, 1, 2, 2], [2, 2, 2, 2]])
    {'maxvio': 0.25, 'maxvio_per_layer': [0.5, 0.0]}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Maxvio(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"loads": datasets.Sequence(datasets.Value("float64"))}),
            reference_urls=["https://arxiv.org/abs/2408.15664"],
        )

    def _compute(self, loads):
        per_layer = []
        for layer, row in enumerate(loads):
            row = np.asarray(row, dtype=np.float64)  # (E,)
            if row.size == 0 or not np.isfinite(row).all() or (row < 0).any() or row.sum() == 0:
                raise ValueError(f"loads[{layer}] must be finite counts >= 0 with a positive sum, got {row.tolist()}.")
            per_layer.append(float((row.max() - row.mean()) / row.mean()))
        return {"maxvio": float(np.mean(per_layer)), "maxvio_per_layer": per_layer}
