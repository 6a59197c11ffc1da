"""fastmae: a drop-in, fast Masked Autoencoder for PyTorch.

The top-level folder ``kernels/`` is installed as the subpackage ``fastmae.kernels``:
a top-level ``kernels`` package would shadow the unrelated PyPI package of that name.
"""
from setuptools import setup

setup(
    name="fastmae",
    version="0.1.0",
    description="A drop-in, fast Masked Autoencoder (MAE) for PyTorch with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastmae", "fastmae.kernels"],
    package_dir={"fastmae": "fastmae", "fastmae.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.2; platform_system == 'Linux'",
        "numpy",
        # PNG and image files for `fastmae reconstruct`, pretraining data and charts
        "pillow",
        # progress bars for long benchmark and training runs
        "tqdm",
        # safe tensor files: checkpoints that can never run code
        "safetensors",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "transformers", "matplotlib"],
        "bench": ["pytest-benchmark", "matplotlib"],
    },
    entry_points={"console_scripts": ["fastmae = fastmae.cli:main"]},
)
