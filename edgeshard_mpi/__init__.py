"""edgeshard-mpi: EdgeShard LLM inference over MPI ranks on unequal devices."""

__version__ = "0.1.0"
