from setuptools import find_packages, setup

setup(
    name="edgeshard-mpi",
    version="0.1.0",
    description="EdgeShard LLM batch inference over MPI ranks on unequal devices",
    packages=find_packages(include=["edgeshard_mpi", "edgeshard_mpi.*"]),
    package_data={"edgeshard_mpi": ["csrc/*.c", "csrc/*.cpp"]},  # the CPU kernels, built at first use
    python_requires=">=3.11",
    # torch is pinned by the install command (the CPU build on CPU machines), not here
    install_requires=[
        "torch>=2.4",
        "transformers==5.24.0",
        "accelerate>=1.0",  # transformers needs it to read GGUF
        "gguf>=0.10",
        "safetensors>=0.4",
        "mpi4py>=4.0",
        "mpich",
        "numpy",
        "h5py>=3.8",
        "tqdm",
        "pytest",
        "hypothesis",  # the parser fuzz tests
    ],
    # plot: timelines and the benchmarks' plots; parquet: `export --format parquet`; test: what the tests
    # check exports with (the `openai` package's own types, never imported outside the tests) and read
    # Parquet back with
    extras_require={"plot": ["matplotlib>=3.7"], "parquet": ["pyarrow"], "test": ["openai", "pyarrow"]},
    entry_points={"console_scripts": ["edgeshard=edgeshard_mpi.cli:main"]},
)
