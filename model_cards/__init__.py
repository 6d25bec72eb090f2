"""Model-card templates (Jinja, rendered by `hf_lossfree_moe.model_card`).

This top-level folder is installed as the package `hf_lossfree_moe.model_cards` (see `package-dir` in
pyproject.toml), so the library reads the templates with `importlib.resources` from a clone, an editable install and
a wheel alike.
"""
