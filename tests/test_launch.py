"""launch/run.sh and launch/slurm.sbatch, with an mpiexec that only reports how it was called."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

# stands in for mpiexec: records its arguments and the MPICH setting it was given, starts nothing
FAKE_MPIEXEC = """#!/usr/bin/env python3
import json, os, sys
print(json.dumps({"argv": sys.argv[1:], "yield": os.environ.get("MPIR_CVAR_ENABLE_HEAVY_YIELD")}))
"""


@pytest.fixture
def fake_mpiexec(tmp_path):
    path = tmp_path / "fake-mpiexec"
    path.write_text(FAKE_MPIEXEC)
    path.chmod(0o755)
    return path


def _run(cmd: list, env: dict, cwd=ROOT) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if k not in ("NP", "HOSTFILE", "PYTHON", "MPIEXEC", "MPIEXEC_ARGS", "MPIR_CVAR_ENABLE_HEAVY_YIELD",
                         "DEVICES", "SLURM_JOB_NODELIST", "SLURM_SUBMIT_DIR", "SLURM_JOB_ID")}
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=60, cwd=cwd,
                          env={**base, "PYTHONPATH": str(ROOT), **env})


def _run_args(called: dict) -> list[str]:
    """What the launcher gave `edgeshard run` after the job: its own options (a launch folder next to the
    results, the results file, the step timeout), then the user's."""
    argv = called["argv"]
    return argv[argv.index("run") + 1:]


def test_run_sh_defaults_and_prints_the_command(fake_mpiexec, tmp_path):
    results = str(tmp_path / "demo.h5")
    proc = _run([ROOT / "launch" / "run.sh", "jobs/demo.toml", "--output", results, "--overwrite"],
                {"MPIEXEC": str(fake_mpiexec)})
    assert proc.returncode == 0, proc.stderr
    called = json.loads(proc.stdout)
    # NP from the default hostfile's slots (local3.hosts: three), PYTHON=python, the yield setting on,
    # and the run under `edgeshard launch`, which resumes it on the survivors after a loss
    assert called["argv"][:7] == ["-f", "hostfiles/local3.hosts", "-n", "3", "python", "-m", "edgeshard_mpi"]
    assert _run_args(called) == ["jobs/demo.toml", "--hostfile", "hostfiles/local3.hosts", "--launch-dir",
                                 results + ".launch", "--output", results, "--step-timeout", "25", "--overwrite"]
    assert called["yield"] == "1"
    first = proc.stderr.splitlines()[0]
    assert first == (f"+ MPIR_CVAR_ENABLE_HEAVY_YIELD=1 MPIEXEC={fake_mpiexec} MPIEXEC_ARGS='' python -m edgeshard_mpi "
                     f"launch jobs/demo.toml -f hostfiles/local3.hosts -n 3 --max-restarts 3 --output {results} "
                     "--overwrite")
    assert "edgeshard launch: epoch 0: the job is done" in proc.stderr


def test_run_sh_takes_every_setting_from_the_environment(fake_mpiexec, tmp_path):
    hosts = tmp_path / "two.hosts"
    hosts.write_text("# device: name=a\nnode1:2\n  # a comment\n\nnode2\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "Hi"}\n')
    job = tmp_path / "my job.toml"
    job.write_text('model = "tiny-random"\nprompts = "p.jsonl"\noutput = "my job.h5"\n')
    env = {"MPIEXEC": str(fake_mpiexec), "HOSTFILE": str(hosts), "PYTHON": sys.executable,
           "MPIEXEC_ARGS": "-launcher ssh -iface eth0", "MPIR_CVAR_ENABLE_HEAVY_YIELD": "0", "MAX_RESTARTS": "1"}
    proc = _run([ROOT / "launch" / "run.sh", job], env)
    assert proc.returncode == 0, proc.stderr
    called = json.loads(proc.stdout)
    assert called["argv"][:9] == ["-launcher", "ssh", "-iface", "eth0", "-f", str(hosts), "-n", "3",
                                  sys.executable]  # 2 + 1 slots
    assert _run_args(called)[:3] == [str(job), "--hostfile", str(hosts)]
    assert called["yield"] == "0"
    assert "MPIR_CVAR_ENABLE_HEAVY_YIELD=0" in proc.stderr and r"my\ job.toml" in proc.stderr  # pasteable
    assert "--max-restarts 1" in proc.stderr.splitlines()[0]
    proc = _run([ROOT / "launch" / "run.sh", job], {**env, "NP": "1"})
    assert json.loads(proc.stdout)["argv"][6:8] == ["-n", "1"]


def test_run_sh_refuses_a_missing_hostfile(fake_mpiexec):
    proc = _run([ROOT / "launch" / "run.sh", "j.toml"], {"MPIEXEC": str(fake_mpiexec), "HOSTFILE": "/no/such.hosts"})
    assert proc.returncode == 2
    assert "hostfile /no/such.hosts not found" in proc.stderr and proc.stdout == ""


def test_slurm_sbatch_writes_the_hostfile_and_launches_on_it(fake_mpiexec, tmp_path):
    hosts = tmp_path / "slurm.hosts"
    env = {"MPIEXEC": str(fake_mpiexec), "SLURM_JOB_NODELIST": "edge[01-02],gpu-a3", "SLURM_SUBMIT_DIR": str(ROOT),
           "SLURM_JOB_ID": "42", "HOSTFILE": str(hosts)}
    proc = _run(["bash", ROOT / "launch" / "slurm.sbatch", "jobs/demo.toml", "--output", tmp_path / "demo.h5",
                 "--overwrite"], env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    called = json.loads(proc.stdout)
    # two edge boards and a two-GPU server: four ranks, in node-list order
    assert called["argv"][:4] == ["-f", str(hosts), "-n", "4"]
    assert _run_args(called)[:3] == ["jobs/demo.toml", "--hostfile", str(hosts)] and called["argv"][-1] == "--overwrite"
    assert "# device: name=gpu-a3-1 memory=38GiB torch=cuda:1" in hosts.read_text()
    # outside SLURM it says so instead of launching on a guessed host list
    del env["SLURM_JOB_NODELIST"]
    proc = _run(["bash", ROOT / "launch" / "slurm.sbatch", "jobs/demo.toml"], env)
    assert proc.returncode != 0 and "not inside a SLURM job" in proc.stderr and proc.stdout == ""
