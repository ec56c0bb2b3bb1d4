"""moe_jax: Mixture-of-Experts language models in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="moe_jax",
    version="0.1.0",
    description="Mixture-of-Experts layers, routers and language models in JAX/Flax (linen).",
    packages=find_packages(include=["moe_jax", "moe_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.0,<0.11",
        "jaxlib>=0.10.0,<0.11",
        "flax>=0.12.0,<0.13",
        "optax>=0.2.6,<0.3",
        "orbax-checkpoint>=0.12.0,<0.13",
        "ml-collections>=1.1.0,<1.2",
        "absl-py>=2.0",
        "numpy>=1.26",
        "sentencepiece>=0.2.0",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "tqdm>=4.66",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "jupytext>=1.16",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
        ],
        # Weight interchange with HuggingFace transformers' MoE blocks (moe_jax/interop.py, tests/test_interop.py).
        # torch 2.13.0 resolves to the CPU build on the project's machines (local wheel); transformers >= 5 keeps
        # MoE experts as fused 3-D tensors, which is the layout interop.py reads.
        "interop": [
            "torch==2.13.0",
            "transformers==5.23.0",
        ],
        # The data-rich built-in corpus data.corpus='transformers_src' (docs/corpus.md): only the package's .py
        # files are read, so `pip install --no-deps transformers==5.23.0` is enough; the pin defines the corpus.
        "corpus": [
            "transformers==5.23.0",
        ],
    },
)
