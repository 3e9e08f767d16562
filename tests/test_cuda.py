"""The CUDA path: a stage on a GPU gives the tokens of `generate` on that GPU (skips without a GPU)."""

from __future__ import annotations

import pytest
import torch

from conftest import reference_tokens, run_mpi, write_job
from edgeshard_mpi.results import read_results

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")

PROMPTS = ["The quick brown fox", "def fibonacci(n):"]


def test_cuda_stage_equals_generate(tmp_path, tiny_path):
    hosts = tmp_path / "gpu.hosts"
    hosts.write_text("# device: name=cpu\nlocalhost:1\n# device: name=gpu torch=cuda:0\nlocalhost:1\n")
    job = write_job(tmp_path, "tiny-random", [{"id": str(i), "prompt": p} for i, p in enumerate(PROMPTS)],
                    extra="micro_batch_size = 2", plan="[plan]\nstages = [{rank = 0, first = 0, last = 0}, "
                                                      "{rank = 1, first = 1, last = 7}]\n")
    proc = run_mpi(["run", str(job), "--hostfile", str(hosts), "--no-progress"], 2)
    assert proc.returncode == 0, proc.stderr
    # rank 0 only looks up embeddings (exact anywhere); every block and the head run on the GPU, as in the reference
    ref = reference_tokens(tiny_path, PROMPTS, 12, 2, device="cuda:0")
    by_id = {r.id: r.token_ids for r in read_results(tmp_path / "job.h5")}
    assert [by_id[str(i)] for i in range(len(PROMPTS))] == ref
