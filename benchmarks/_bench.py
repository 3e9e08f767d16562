"""Run `edgeshard bench` under mpiexec from a benchmark script and return its rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeshard_mpi.cluster import parse_hostfile  # noqa: E402


def slots(hostfile: Path) -> int:
    """Ranks a hostfile offers: one per slot of each `host[:slots]` line."""
    n = 0
    for line in hostfile.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            n += int(line.partition(":")[2] or 1)
    return n


def with_work_clock(src: Path, dst: Path) -> str:
    """A copy of hostfile `src` with clock=work on every emulated device (slowdown > 1)."""
    emulated = {d.name for d in parse_hostfile(src).devices if d.slowdown != 1.0}
    lines = []
    for line in src.read_text().splitlines():
        body = line.lstrip("#").strip()
        if line.startswith("#") and body.startswith("device:") and any(f"name={n}" in body.split() for n in emulated):
            line += " clock=work"
        lines.append(line)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("\n".join(lines) + "\n")
    return str(dst)


TOPICS = ["the ocean", "a robot", "mountains", "a city at night", "bread", "a violin", "the moon", "rain",
          "a library", "trains", "a garden", "winter", "bees", "a lighthouse", "chess", "volcanoes"]


def chat_job(work: Path, name: str, prompts: int) -> Path:
    """`work/NAME.toml`: smollm2-135m fp32, `prompts` chat requests ("Write a few lines about ..."),
    micro-batches of 2, 24 new tokens, the throughput plan, no-bubbles."""
    lines = [{"id": f"r{i:03d}", "messages": [{"role": "user", "content": f"Write a few lines about "
                                                                           f"{TOPICS[i % len(TOPICS)]}."}]}
             for i in range(prompts)]
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    job = work / f"{name}.toml"
    job.write_text('model = "smollm2-135m"\ndtype = "float32"\nprompts = "prompts.jsonl"\nmicro_batch_size = 2\n'
                   'schedule = "no-bubbles"\n[generation]\nmax_new_tokens = 24\n[plan]\nobjective = "throughput"\n')
    return job


def run_bench(hostfile: str, job: str, configs: list[str], out: Path, profiles: Path | None = None,
              extra: list[str] = ()) -> list[dict]:
    """`mpiexec -f HOSTFILE -n SLOTS python -m edgeshard_mpi bench JOB --configs ... --json OUT`.

    profiles: the folder for saved profiles (EDGESHARD_PROFILES); a benchmark gives a fresh one, so
    that the profile is measured minutes before the runs it predicts, on the host as it is now.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    hosts = ROOT / hostfile
    cmd = ["mpiexec", "-f", str(hosts), "-n", str(slots(hosts)), sys.executable, "-m", "edgeshard_mpi", "bench",
           str(ROOT / job), "--hostfile", str(hosts), "--configs", ",".join(configs), "--json", str(out), *extra]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPIR_CVAR_ENABLE_HEAVY_YIELD": "1"}
    if profiles is not None:
        env["EDGESHARD_PROFILES"] = str(profiles)
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    return json.loads(out.read_text())
