"""The scripts of hf-lossfree-moe: training, the paper replay, the benchmark, export and plotting entry points.

Installed beside the library as the `hf_lossfree_moe_scripts` package and runnable from a clone as
`python scripts/<name>.py`. They import `hf_lossfree_moe`; the library never imports them.
"""
