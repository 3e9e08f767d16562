"""Peak RSS of `edgeshard profile` per rank against its device's memory, on a model near the budget.

    python benchmarks/profile_rss.py [--ranks 3] [--memory 1400MiB] [--layers 16] [--hidden 2048]

Builds a seeded random Llama (at the defaults 822M parameters, 3.1 GiB in fp32: embedding and tied
head 384 MiB each, blocks 172 MiB), profiles it under mpiexec on `--ranks` devices of `--memory`
each, and prints every rank's peak RSS and the memory its measuring took beyond what the rank held
before (the profile's `peak_rss` and `peak_bytes`). Target: peak RSS <= memory + 500 MB on every
rank: a rank profiles one unit at a time, within its budget, as it would run.
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

from edgeshard_mpi.cluster import parse_bytes  # noqa: E402

MiB = 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=3)
    ap.add_argument("--memory", default="1400MiB")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    memory = parse_bytes(args.memory)

    import family_models

    family_models.BASE.update(hidden_size=args.hidden, intermediate_size=args.hidden * 9 // 4,
                              num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=16)
    family_models.FAMILY_CONFIGS["llama"] = {"tie_word_embeddings": True}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = family_models.save_family("llama", tmp / "llama")
        (tmp / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Tell me about the number {i}."}) + "\n"
                                                   for i in range(4)))
        (tmp / "job.toml").write_text(f'model = "{model_dir}"\nprompts = "prompts.jsonl"\noutput = "out.h5"\n'
                                      f"[generation]\nmax_new_tokens = 16\n")
        hosts = tmp / "hosts"
        hosts.write_text("".join(f"# device: name=d{r} memory={args.memory}\nlocalhost:1\n" for r in range(args.ranks)))
        cmd = ["mpiexec", "-f", str(hosts), "-n", str(args.ranks), sys.executable, "-m", "edgeshard_mpi", "profile",
               str(tmp / "job.toml"), "--hostfile", str(hosts), "--out", str(tmp / "p.json"),
               "--repeats", str(args.repeats)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MPIR_CVAR_ENABLE_HEAVY_YIELD": "1"}
        print("+", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, env=env, cwd=tmp)
        prof = json.loads((tmp / "p.json").read_text())
    units = prof["units"]
    total = sum(u["param_bytes"] for u in units)
    print(f"\nllama, {args.layers} blocks, hidden {args.hidden}: {total / MiB:.0f} MiB of weights (fp32), largest unit "
          f"{max(u['param_bytes'] for u in units) / MiB:.0f} MiB; {args.ranks} devices of {args.memory}")
    print(f"{'rank':>4}  {'peak RSS MiB':>12}  {'measuring took MiB':>18}  {'RSS - memory MiB':>16}  <= 500 MB")
    for r, d in enumerate(prof["devices"]):
        over = d["peak_rss"] - memory
        print(f"{r:>4}  {d['peak_rss'] / MiB:>12.0f}  {d['peak_bytes'] / MiB:>18.0f}  {over / MiB:>16.0f}  "
              f"{'yes' if over <= 500e6 else 'NO'}")


if __name__ == "__main__":
    main()
