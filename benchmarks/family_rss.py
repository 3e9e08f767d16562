"""Peak RSS per rank against its shard's bytes, for a family other than Llama.

    python benchmarks/family_rss.py [--family qwen2] [--ranks 3] [--layers 16] [--hidden 1024]

Builds a seeded random model of the family (about 1.1 GB in fp32 at the defaults: untied head, every
block 44 MB), runs a job of 6 prompts on it under mpiexec with an even split, and prints each rank's
peak RSS (the run's summary) beside its shard's weight bytes. Target: RSS <= shard bytes + 500 MB on
every rank, which holds only if each rank reads its own tensors and nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _bench import ROOT  # noqa: E402

MiB = 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="qwen2")
    ap.add_argument("--ranks", type=int, default=3)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    args = ap.parse_args()

    import family_models

    family_models.BASE.update(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                              num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=2)
    family_models.FAMILY_CONFIGS[args.family] = {**family_models.FAMILY_CONFIGS[args.family],
                                                 "tie_word_embeddings": False}
    if "layer_types" in family_models.FAMILY_CONFIGS[args.family]:
        family_models.FAMILY_CONFIGS[args.family]["layer_types"] = ["sliding_attention", "full_attention"] * (args.layers // 2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = family_models.save_family(args.family, tmp / args.family)
        prompts = tmp / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Tell me about the number {i}."}) + "\n"
                                   for i in range(6)))
        job = tmp / "job.toml"
        job.write_text(f'model = "{model_dir}"\nprompts = "prompts.jsonl"\noutput = "out.h5"\nmicro_batch_size = 2\n'
                       f"[generation]\nmax_new_tokens = 16\n")
        cmd = ["mpiexec", "-n", str(args.ranks), sys.executable, "-m", "edgeshard_mpi", "run", str(job), "--no-progress"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MPIR_CVAR_ENABLE_HEAVY_YIELD": "1"}
        subprocess.run(cmd, check=True, env=env, cwd=tmp)
        from edgeshard_mpi.results import read_attrs

        stages = json.loads(read_attrs(tmp / "out.h5")["summary"])["stages"]
    total = sum(s["bytes"] for s in stages)
    print(f"\n{args.family}, {args.layers} blocks, hidden {args.hidden}: {total / MiB:.0f} MiB of weights over "
          f"{len(stages)} ranks (fp32)")
    print(f"{'rank':>4}  {'units':<22} {'shard MiB':>9}  {'peak RSS MiB':>12}  {'RSS - shard':>11}  <= 500 MB")
    for s in stages:
        over = s["peak_rss"] - s["bytes"]
        print(f"{s['rank']:>4}  {s['units']:<22} {s['bytes'] / MiB:>9.0f}  {s['peak_rss'] / MiB:>12.0f}  "
              f"{over / MiB:>11.0f}  {'yes' if over <= 500e6 else 'NO'}")


if __name__ == "__main__":
    main()
