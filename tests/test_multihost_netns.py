"""A real multi-host run on one machine: three network namespaces on a switch, one host's link
shaped to 5 Mbit/s by tc (launch/netns.sh), mpiexec over TCP between them (launch/netns-mpiexec.sh).

The job gives the tokens of a one-host run; the profiler measures the shaped link; the latency
plan leaves out the host behind it, and puts it back once the same profile says its link is fast.
Skipped, with the reason, where namespaces cannot be made (not root, no iproute2, a sandbox that
forbids them); `benchmarks/multihost_netns.sh` is the same check by hand. About 30-40 s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, run_mpi, write_job
from edgeshard_mpi.cluster import parse_hostfile
from edgeshard_mpi.profiler import Profile
from edgeshard_mpi.results import read_attrs, read_results

HOSTFILE = ROOT / "hostfiles" / "netns3.hosts"
SHAPED = 5e6 / 8  # launch/netns.sh: tc tbf rate 5mbit, in bytes/s
PROMPTS = ["The quick brown fox", "In a distant galaxy, a lone explorer discovered", "def fibonacci(n):",
           "Once upon a time"]
# a per-process prefix: engineers' test runs on one machine each get their own hosts (each set is
# its own isolated network, so the same addresses do not clash)
PREFIX = f"es{os.getpid()}-"
ENV = {"NETNS_PREFIX": PREFIX}


def _why_no_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"no `{tool}` (Debian's iproute2)"
    probe = f"{PREFIX}probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"this sandbox forbids network namespaces (ip netns add: {made.stderr.strip()})"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ours() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def _sh(args: list, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **ENV, **(env or {})}, cwd=ROOT)


@pytest.fixture(scope="module")
def hosts():
    why = _why_no_namespaces()
    if why:
        pytest.skip(why)
    try:
        up = _sh([ROOT / "launch" / "netns.sh", "up"])
        if up.returncode != 0:
            pytest.skip(f"launch/netns.sh up failed here: {up.stderr.strip()}")
        yield
    finally:  # whatever happened, the namespaces go (netns.sh up cleans up after itself on failure)
        _sh([ROOT / "launch" / "netns.sh", "down"])
        assert _ours() == [], f"namespaces left behind: {_ours()}"


def _netns_mpiexec(args: list, hostfile=HOSTFILE, timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = [ROOT / "launch" / "netns-mpiexec.sh", "-f", hostfile, "-n", "3", sys.executable, "-m", "edgeshard_mpi",
           *args]
    try:
        return _sh(cmd, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"mpiexec across the namespaces did not finish in {timeout} s\n{e.stderr}")


def _tbf_sent_bytes(ns: str) -> int:
    """Bytes the shaped host has sent through its tbf qdisc (tc -s counts them)."""
    out = subprocess.run(["tc", "-s", "-n", ns, "qdisc", "show", "dev", "eth0"], capture_output=True,
                         text=True, check=True).stdout
    assert "tbf" in out, out
    return int(re.search(r"Sent (\d+) bytes", out).group(1))


def _job(tmp_path, micro_batch_size: int = 16):
    return write_job(tmp_path, "tiny-random", [{"id": str(i), "prompt": p} for i, p in enumerate(PROMPTS)],
                     extra=f"micro_batch_size = {micro_batch_size}")


def test_the_hostfile_declares_three_hosts_without_link_emulation():
    # the shaping is tc's on real sockets: the package's own link emulation must stay off here
    devices = parse_hostfile(HOSTFILE).devices
    assert [d.host for d in devices] == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
    assert all(d.bandwidth is None and d.latency == 0 for d in devices)


def test_a_run_across_the_hosts_gives_the_tokens_of_one_host(hosts, tmp_path, tiny_path):
    job = _job(tmp_path)
    before = _tbf_sent_bytes(f"{PREFIX}h1")
    # through launch/run.sh, as a user would: the units split evenly, so every host holds a shard
    # and the activations cross the shaped link twice (h0 -> h1 -> h2)
    proc = _sh([ROOT / "launch" / "run.sh", job, "--no-progress"], timeout=180,
               env={"MPIEXEC": str(ROOT / "launch" / "netns-mpiexec.sh"), "HOSTFILE": str(HOSTFILE),
                    "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    assert "netns-mpiexec.sh -f" in proc.stderr  # run.sh printed what it ran
    multi = {r.id: r for r in read_results(tmp_path / "job.h5")}
    cluster = json.loads(read_attrs(tmp_path / "job.h5")["cluster"])
    assert [d["host"] for d in cluster["devices"]] == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
    plan = json.loads(read_attrs(tmp_path / "job.h5")["plan"])
    assert [s["rank"] for s in plan["stages"]] == [0, 1, 2]

    single = run_mpi(["run", str(job), "--output", str(tmp_path / "one.h5"), "--no-progress"], 1, timeout=120)
    assert single.returncode == 0, single.stderr
    one = {r.id: r for r in read_results(tmp_path / "one.h5")}
    assert sorted(multi) == sorted(one) == [str(i) for i in range(len(PROMPTS))]
    for i in one:
        assert multi[i].token_ids == one[i].token_ids, i
        assert multi[i].output_tokens >= 1

    # the activations really went through the shaped link: h1 sends h2 one hidden state (64 fp32)
    # per row for every decode step, besides the prompts' and MPI's own bytes
    decode_bytes = sum(r.output_tokens - 1 for r in one.values()) * 64 * 4
    assert _tbf_sent_bytes(f"{PREFIX}h1") - before >= decode_bytes


def test_profile_measures_the_shaped_link_and_the_plan_goes_around_it(hosts, tmp_path, tiny_path):
    # planned for micro-batches of 128 rows: 32 KiB of activations a decode step, 52 ms over the
    # shaped link and twice that a step (h1 cannot hold the head). The devices are netns3.hosts'
    # with h2 3x slower than one core instead of 8x, and timing their work (clock=work): their
    # figures share one calibration, each unit's least time per unit of slowdown on any of them,
    # so h2's blocks cost exactly twice h1's, a lead of about 10-17 ms a step for h1, which the
    # host would have to run 6x slower throughout the profile to bring to 104 ms. With netns3.hosts
    # as it is (slowdown 8, each device timed on its own CPU time), h1's lead was 75 ms in one profile
    # here (44-61 ms with clock=work) and, once in a suite, above the 104 ms: the plan kept h1.
    hostfile = tmp_path / "netns3-work.hosts"
    hostfile.write_text("# device: name=h0-board slowdown=16 clock=work\n10.77.0.1:1\n"
                        "# device: name=h1-fast slowdown=1.5 memory=4MiB clock=work\n10.77.0.2:1\n"
                        "# device: name=h2-big slowdown=3 clock=work\n10.77.0.3:1\n")
    job = _job(tmp_path, micro_batch_size=128)
    out = tmp_path / "profile.json"
    proc = _netns_mpiexec(["profile", str(job), "--hostfile", str(hostfile), "--out", str(out), "--repeats", "5"],
                          hostfile)
    assert proc.returncode == 0, proc.stderr
    prof = Profile.load(out)
    bw = prof.bandwidth
    # every link of h1 (rank 1) is the shaped one; h0 <-> h2 is a plain veth, far faster
    for k, j in ((0, 1), (1, 2)):
        assert 0.8 * SHAPED < bw[k][j] < 1.2 * SHAPED, f"link {k}->{j}: {bw[k][j] * 8 / 1e6:.1f} Mbit/s"
    assert bw[0][2] is None or bw[0][2] > 10 * SHAPED, bw[0][2]

    def plan_ranks(profile_path) -> list[int]:
        p = _sh([sys.executable, "-m", "edgeshard_mpi", "plan", "--profile", profile_path, "--objective", "latency",
                 "--json"])
        assert p.returncode == 0, p.stderr
        return [s["rank"] for s in json.loads(p.stdout)["stages"]]

    # h1 computes fastest, but every step would cross its 5 Mbit/s link twice (it cannot hold
    # the head): the plan sends the blocks to h2 instead of keeping them on the slow source
    ranks = plan_ranks(out)
    assert 1 not in ranks and ranks == [0, 2], ranks

    # the same measurements with h1's links as fast as h0 <-> h2: now h1 gets the blocks, so it
    # was the shaped link, not h1's compute or memory, that kept it out. Every figure of h1 is
    # half of h2's, the cold start of a stage too, so no noise of the timing can close that gap
    d = json.loads(out.read_text())
    h1, h2 = d["devices"][1], d["devices"][2]
    for key in ("decode_s", "prefill_s"):
        for a, b in zip(h1[key], h2[key]):
            assert a is None or a == pytest.approx(b / 2), (key, h1[key], h2[key])
    assert h1["decode_step_s"] == pytest.approx(h2["decode_step_s"] / 2)
    for k in (0, 2):
        d["bandwidth"][k][1] = d["bandwidth"][1][k] = d["bandwidth"][0][2]
        d["latency"][k][1] = d["latency"][1][k] = d["latency"][0][2]
    fast = tmp_path / "unshaped.json"
    fast.write_text(json.dumps(d))
    assert 1 in plan_ranks(fast)
