"""SLURM node lists to hostfiles with device declarations (in-process, no SLURM needed)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from edgeshard_mpi import slurm
from edgeshard_mpi.cluster import parse_hostfile
from edgeshard_mpi.slurm import SlurmError, build_hostfile, check_hostfile, expand_nodelist, load_device_types

DEVICES = """
[types.orin]
nodes = ["edge*"]
memory = "6GiB"
slowdown = 2

[types.a100]
nodes = ["gpu-a*"]
slots = 2
memory = "38GiB"
torch = "cuda:{slot}"
link = "10Gbit"
dtype = "float16"
"""


@pytest.mark.parametrize("text,hosts", [
    ("node01", ["node01"]),
    ("a,b", ["a", "b"]),
    ("node[01-03,07],gpu-a[1-2]", ["node01", "node02", "node03", "node07", "gpu-a1", "gpu-a2"]),
    ("n[8-10]", ["n8", "n9", "n10"]),  # no padding unless the lower bound has it
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
    (" c[0-1] ", ["c0", "c1"]),
])
def test_expand_nodelist(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize("text,needle", [
    ("", "node list is empty"),
    ("n[1-", "'[' is not closed"),
    ("n1]", "']' without '['"),
    ("n[[1]]", "nested '['"),
    ("n[]", "empty brackets"),
    ("n[3-1]", "range 3-1 runs backwards"),
    ("n[a-b]", "'a-b' in [a-b] is not N or N-M"),
    ("a,,b", "empty name between commas"),
    ("n[1-2],n2", "node(s) n2 listed more than once"),
])
def test_bad_nodelists_say_what_is_wrong(text, needle):
    with pytest.raises(SlurmError, match=re.escape(needle)):
        expand_nodelist(text)


def test_hostfile_declares_each_slot_and_edgeshard_reads_it(tmp_path):
    devices = tmp_path / "devices.toml"
    devices.write_text(DEVICES)
    text = build_hostfile(expand_nodelist("edge[01-02],gpu-a7"), load_device_types(devices))
    hosts = tmp_path / "job.hosts"
    hosts.write_text(text)
    # MPICH reads host lines only; every `#` line is whole (MPICH rejects trailing comments)
    assert [line for line in text.splitlines() if not line.startswith("#")] == ["edge01:1", "edge02:1", "gpu-a7:2"]
    cluster = parse_hostfile(hosts)
    assert [(d.name, d.host, d.torch, d.memory, d.slowdown) for d in cluster.devices] == [
        ("edge01", "edge01", "cpu", 6 * 2**30, 2.0),
        ("edge02", "edge02", "cpu", 6 * 2**30, 2.0),
        ("gpu-a7-0", "gpu-a7", "cuda:0", 38 * 2**30, 1.0),
        ("gpu-a7-1", "gpu-a7", "cuda:1", 38 * 2**30, 1.0),
    ]
    assert cluster.devices[2].bandwidth == 10e9 / 8
    assert [d.dtype for d in cluster.devices] == [None, None, "float16", "float16"]


def test_first_matching_type_wins_and_names_follow_the_template(tmp_path):
    devices = tmp_path / "d.toml"
    devices.write_text('[types.special]\nnodes = ["edge02"]\nname = "{type}-{node}"\nmemory = "1GiB"\n'
                       '[types.rest]\nnodes = ["edge*"]\n')
    cluster = check_hostfile(build_hostfile(["edge01", "edge02"], load_device_types(devices)))
    assert [(d.name, d.memory) for d in cluster.devices] == [("edge01", None), ("special-edge02", 2**30)]


def test_a_node_of_no_type_names_the_node_and_the_file(tmp_path):
    devices = tmp_path / "devices.toml"
    devices.write_text(DEVICES)
    with pytest.raises(SlurmError) as e:
        build_hostfile(["edge01", "cpu7"], load_device_types(devices))
    assert str(devices) in str(e.value) and "'cpu7'" in str(e.value) and "edge*" in str(e.value)


@pytest.mark.parametrize("toml,needle", [
    ("", "no device types"),
    ("[types.x]\nmemory = '1GiB'\n", r"\[types.x\]: nodes must be a non-empty list"),
    ("[types.x]\nnodes = ['a*']\nmemroy = '1GiB'\n", "unknown key.s. memroy"),
    ("[types.x]\nnodes = ['a*']\nslots = 0\n", "slots must be a positive integer"),
    ("[types.x]\nnodes = ['a*']\nslots = 2\nname = 'fixed'\n", "with {slot} when slots > 1"),
    ("[types.x]\nnodes = ['a*']\nmemory = '1 GiB'\n", "must be one word"),
    ("[types.x]\nnodes = ['a*']\ntorch = 'cuda:{gpu}'\n", "bad template"),
    ("[type.x]\nnodes = ['a*']\n", "unknown top-level key.s. type"),
    ("[types.x\n", "not TOML"),
])
def test_bad_devices_files_name_the_file_and_field(tmp_path, toml, needle):
    devices = tmp_path / "bad.toml"
    devices.write_text(toml)
    with pytest.raises(SlurmError, match=needle) as e:
        build_hostfile(["a1"], load_device_types(devices))
    assert str(devices) in str(e.value)


def test_a_field_the_hostfile_parser_rejects_stops_before_mpiexec(tmp_path):
    devices = tmp_path / "d.toml"
    devices.write_text('[types.x]\nnodes = ["a*"]\nmemory = "lots"\n')
    with pytest.raises(SlurmError, match="edgeshard rejects: .*field memory"):
        check_hostfile(build_hostfile(["a1"], load_device_types(devices)))


def test_scontrol_expands_when_present_and_the_own_expander_otherwise(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\necho fromscontrol1\necho fromscontrol2\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert slurm.hostnames("x[1-2]") == ["fromscontrol1", "fromscontrol2"]
    fake.write_text("#!/bin/sh\nexit 1\n")  # a broken scontrol: fall back, don't fail the job
    assert slurm.hostnames("x[1-2]") == ["x1", "x2"]


def test_command_line_writes_the_hostfile_from_the_environment(tmp_path):
    out = tmp_path / "slurm.hosts"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLURM_JOB_NODELIST": "edge[1-2],gpu-a1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "edgeshard_mpi.slurm", "--devices",
                           str(ROOT / "launch" / "devices.example.toml"), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "3 node(s), 4 slot(s)" in proc.stderr
    assert [d.name for d in parse_hostfile(out).devices] == ["edge1", "edge2", "gpu-a1-0", "gpu-a1-1"]
    env["SLURM_JOB_NODELIST"] = "edge1,login9"
    proc = subprocess.run([sys.executable, "-m", "edgeshard_mpi.slurm", "--devices",
                           str(ROOT / "launch" / "devices.example.toml"), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1
    assert "node 'login9' matches no device type" in proc.stderr and "devices.example.toml" in proc.stderr
