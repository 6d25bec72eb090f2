"""Small-scale replay of the paper's experiments (Wang et al., arXiv 2408.15664), driven by `reproduce_paper.py`.

- methods.py: the load-balancing methods and which of them each comparison (main table, ablations) shows;
- runs.py: the shared model shape and budget, and one run: train with `Trainer` + `LossFreeBalancingCallback`, then
  measure perplexity and MaxVio on held-out blocks;
- report.py: mean ± std over seeds, the Markdown table, the JSON file and the plots.
"""
