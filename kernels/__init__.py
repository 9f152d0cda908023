"""fastsft.kernels: Triton kernels and their launchers on raw tensors.

No autograd, no nn.Module, no Hugging Face here: fastsft/ops is the only importer.
(Installed as the subpackage `fastsft.kernels` through setup.py's package_dir mapping.)
"""
