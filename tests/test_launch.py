"""launch/run.sh and launch/slurm.sbatch, with an mpiexec that only reports how it was called."""

from __future__ import annotations

import json
import os
import subprocess

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


def test_run_sh_defaults_and_prints_the_command(fake_mpiexec):
    proc = _run([ROOT / "launch" / "run.sh", "jobs/demo.toml", "--overwrite"], {"MPIEXEC": str(fake_mpiexec)})
    assert proc.returncode == 0, proc.stderr
    called = json.loads(proc.stdout)
    # NP from the default hostfile's slots (local3.hosts: three), PYTHON=python, the yield setting on
    assert called == {"argv": ["-f", "hostfiles/local3.hosts", "-n", "3", "python", "-m", "edgeshard_mpi", "run",
                               "jobs/demo.toml", "--hostfile", "hostfiles/local3.hosts", "--overwrite"],
                      "yield": "1"}
    assert proc.stderr.strip() == (f"+ MPIR_CVAR_ENABLE_HEAVY_YIELD=1 {fake_mpiexec} -f hostfiles/local3.hosts -n 3 "
                                   "python -m edgeshard_mpi run jobs/demo.toml --hostfile hostfiles/local3.hosts "
                                   "--overwrite")


def test_run_sh_takes_every_setting_from_the_environment(fake_mpiexec, tmp_path):
    hosts = tmp_path / "two.hosts"
    hosts.write_text("# device: name=a\nnode1:2\n  # a comment\n\nnode2\n")
    proc = _run([ROOT / "launch" / "run.sh", "my job.toml"],
                {"MPIEXEC": str(fake_mpiexec), "HOSTFILE": str(hosts), "PYTHON": "/opt/py/bin/python3",
                 "MPIEXEC_ARGS": "-launcher ssh -iface eth0", "MPIR_CVAR_ENABLE_HEAVY_YIELD": "0"})
    assert proc.returncode == 0, proc.stderr
    called = json.loads(proc.stdout)
    assert called["argv"] == ["-launcher", "ssh", "-iface", "eth0", "-f", str(hosts), "-n", "3",
                              "/opt/py/bin/python3", "-m", "edgeshard_mpi", "run", "my job.toml",
                              "--hostfile", str(hosts)]  # 2 + 1 slots
    assert called["yield"] == "0"
    assert "MPIR_CVAR_ENABLE_HEAVY_YIELD=0" in proc.stderr and r"my\ job.toml" in proc.stderr  # pasteable
    proc = _run([ROOT / "launch" / "run.sh", "j.toml"], {"MPIEXEC": str(fake_mpiexec), "HOSTFILE": str(hosts),
                                                         "NP": "1"})
    assert json.loads(proc.stdout)["argv"][2:4] == ["-n", "1"]


def test_run_sh_refuses_a_missing_hostfile(fake_mpiexec):
    proc = _run([ROOT / "launch" / "run.sh", "j.toml"], {"MPIEXEC": str(fake_mpiexec), "HOSTFILE": "/no/such.hosts"})
    assert proc.returncode == 2
    assert "hostfile /no/such.hosts not found" in proc.stderr and proc.stdout == ""


def test_slurm_sbatch_writes_the_hostfile_and_launches_on_it(fake_mpiexec, tmp_path):
    hosts = tmp_path / "slurm.hosts"
    env = {"MPIEXEC": str(fake_mpiexec), "SLURM_JOB_NODELIST": "edge[01-02],gpu-a3", "SLURM_SUBMIT_DIR": str(ROOT),
           "SLURM_JOB_ID": "42", "HOSTFILE": str(hosts)}
    proc = _run(["bash", ROOT / "launch" / "slurm.sbatch", "jobs/demo.toml", "--overwrite"], env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    called = json.loads(proc.stdout)
    # two edge boards and a two-GPU server: four ranks, in node-list order
    assert called["argv"][:4] == ["-f", str(hosts), "-n", "4"]
    assert called["argv"][-4:] == ["jobs/demo.toml", "--hostfile", str(hosts), "--overwrite"]
    assert "# device: name=gpu-a3-1 memory=38GiB torch=cuda:1" in hosts.read_text()
    # outside SLURM it says so instead of launching on a guessed host list
    del env["SLURM_JOB_NODELIST"]
    proc = _run(["bash", ROOT / "launch" / "slurm.sbatch", "jobs/demo.toml"], env)
    assert proc.returncode != 0 and "not inside a SLURM job" in proc.stderr and proc.stdout == ""
