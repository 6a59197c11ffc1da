"""fastmae: a drop-in, fast Masked Autoencoder for PyTorch.

The top-level folder ``kernels/`` is installed as the subpackage ``fastmae.kernels``:
a top-level ``kernels`` package would shadow the unrelated PyPI package of that name.
"""
import os
import runpy

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPyRecordingCommit(build_py):
    """build_py that also writes fastmae/_build_info.py into the build: the commit the package
    is built from (fastmae/_provenance.py, run by path: nothing of fastmae or torch is
    imported), so that an installed copy's `fastmae bench` and `fastmae check` name it. An
    editable install runs from the checkout itself, which names its commit live: no record."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        provenance = runpy.run_path(os.path.join(HERE, "fastmae", "_provenance.py"))
        source_commit = provenance["source_commit"]
        with open(os.path.join(self.build_lib, "fastmae", "_build_info.py"), "w") as f:
            f.write('"""Written by setup.py when this copy of fastmae was built."""\n'
                    f"COMMIT = {source_commit(HERE)!r}\n")


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
    cmdclass={"build_py": BuildPyRecordingCommit},
)
