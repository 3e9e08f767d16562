from __future__ import annotations

import pytest

from edgeshard_mpi.cluster import Cluster, Device, HostfileError, parse_bytes, parse_hostfile


def _hosts(tmp_path, text):
    p = tmp_path / "c.hosts"
    p.write_text(text)
    return p


def test_sizes():
    assert parse_bytes("8GiB") == 8 * 2**30
    assert parse_bytes("8GB") == 8 * 10**9
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1.5KiB") == 1536
    assert parse_bytes("100") == 100
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("8 gigs")


def test_declarations_fill_slots_in_order(tmp_path):
    c = parse_hostfile(_hosts(tmp_path, "# a cluster\n# device: name=orin memory=8GiB\nnode1:1\n\n"
                                        "# device: name=cloud memory=24GiB torch=cuda:0\nnode2:1\n"
                                        "# device: name=nx memory=4GiB\nnode3:2\nnode4\n"))
    assert [d.name for d in c.devices] == ["orin", "cloud", "nx-0", "nx-1", "node4"]
    assert [d.host for d in c.devices] == ["node1", "node2", "node3", "node3", "node4"]
    assert c.devices[1].memory == 24 * 2**30 and c.devices[1].torch == "cuda:0"
    assert c.devices[4].memory is None and c.devices[4].torch == "cpu"
    assert c.for_world(3).size == 3
    assert Cluster.from_dict(c.to_dict()) == Cluster(c.devices, c.source)


def test_one_declaration_per_slot(tmp_path):
    c = parse_hostfile(_hosts(tmp_path, "# device: name=a\n# device: name=b memory=1GiB\nh:2\n"))
    assert [(d.name, d.memory) for d in c.devices] == [("a", None), ("b", 2**30)]


@pytest.mark.parametrize("text,needle", [
    ("# device: name=a\nh:x\n", "c.hosts:2: slots 'x'"),
    ("# device: name=a\nh:0\n", "c.hosts:2: slots '0'"),
    ("# device: name=a speed=3\nh:1\n", "c.hosts:1: unknown device field 'speed'"),
    ("# device: name=a memory=8gigs\nh:1\n", "c.hosts:1: field memory"),
    ("# device: memory=8GiB\nh:1\n", "c.hosts:1: device declaration has no name"),
    ("# device: name=a name=b\nh:1\n", "given twice"),
    ("# device: name=a torch=tpu\nh:1\n", "torch='tpu'"),
    ("# device: name=a dtype=fp16\nh:1\n", "c.hosts:1: field dtype='fp16' is not one of float32, bfloat16, float16"),
    ("# device: name=a quantize=int4\nh:1\n", "c.hosts:1: field quantize='int4' is not one of int8, none"),
    ("h:1 # the fast one\n", "c.hosts:1: trailing comments"),
    ("# device: name=a\n# device: name=b\n# device: name=c\nh:2\n", "c.hosts:4: host h has 2 slot(s) but 3"),
    ("# device: name=a\nh:1\n# device: name=a\nh:1\n", "c.hosts:3: device name a declared more than once (also at line 1)"),
    ("# device: name=a\n", "not followed by a host line"),
    ("# only comments\n", "no host lines"),
])
def test_errors_name_file_line_and_field(tmp_path, text, needle):
    with pytest.raises(HostfileError) as e:
        parse_hostfile(_hosts(tmp_path, text))
    assert needle in str(e.value)


def test_more_ranks_than_slots(tmp_path):
    c = parse_hostfile(_hosts(tmp_path, "h:2\n"))
    with pytest.raises(HostfileError, match="declares 2 slot.*3 ranks"):
        c.for_world(3)


def test_shipped_hostfiles_parse():
    from conftest import ROOT

    for n in (1, 3, 4):
        c = parse_hostfile(ROOT / "hostfiles" / f"local{n}.hosts")
        assert c.size == n


def test_threads_per_rank(tmp_path):
    # threads=N wins; else the host's cores shared among its ranks; an emulated device keeps one
    from edgeshard_mpi.cluster import default_threads

    c = parse_hostfile(_hosts(tmp_path, "# device: name=a threads=3\nh:1\n# device: name=b\nh:1\n"
                                        "# device: name=c slowdown=2\nh:1\n# device: name=d\nk:1\n"))
    assert [d.threads for d in c.devices] == [3, None, None, None]
    hosts = [(16, 3), (16, 3), (16, 3), (8, 1)]  # (cores, ranks on the host) per rank
    assert [d.threads for d in c.with_threads(hosts).devices] == [3, 5, 1, 8]
    assert default_threads(c.devices[1], cores=2, host_ranks=3) == 1  # never 0
    # an undecided count stays out of the dict, so older profiles' cluster hashes still match
    assert "threads" not in c.devices[1].to_dict() and c.with_threads(hosts).devices[1].to_dict()["threads"] == 5
    assert Cluster.from_dict(c.with_threads(hosts).to_dict()) == c.with_threads(hosts)


def test_dtype_and_quantize_per_device(tmp_path):
    # a device without them takes the job's; quantize=none keeps full weights when the job quantizes
    c = parse_hostfile(_hosts(tmp_path, "# device: name=a\nh:1\n# device: name=b dtype=bfloat16\nh:1\n"
                                        "# device: name=c quantize=int8\nh:1\n"
                                        "# device: name=d dtype=float16 quantize=none\nh:1\n"))
    assert [d.precision("float32", None) for d in c.devices] == [
        ("float32", None), ("bfloat16", None), ("float32", "int8"), ("float16", None)]
    assert [d.precision("bfloat16", "int8") for d in c.devices] == [
        ("bfloat16", "int8"), ("bfloat16", "int8"), ("bfloat16", "int8"), ("float16", None)]
    # undeclared fields stay out of the dict, so older profiles' cluster hashes still match
    assert set(c.devices[0].to_dict()) == {"name", "host", "memory", "torch", "slowdown", "bandwidth", "latency"}
    assert c.devices[3].to_dict()["dtype"] == "float16" and c.devices[3].to_dict()["quantize"] == "none"
    assert Cluster.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="dtype='half' is not one of"):
        Device(name="x", dtype="half")


def test_clock_per_device(tmp_path):
    # clock=work times an emulated device's work instead of its CPU time; cpu, the default, stays
    # out of the dict, so older profiles' cluster hashes still match
    c = parse_hostfile(_hosts(tmp_path, "# device: name=a slowdown=3 clock=work\nh:1\n# device: name=b slowdown=2\nh:1\n"))
    assert [d.clock for d in c.devices] == ["work", "cpu"]
    assert c.devices[0].to_dict()["clock"] == "work" and "clock" not in c.devices[1].to_dict()
    assert Cluster.from_dict(c.to_dict()) == c
    with pytest.raises(HostfileError, match=r":1: field clock=.wall. is not one of cpu, work"):
        parse_hostfile(_hosts(tmp_path, "# device: name=a slowdown=3 clock=wall\nh:1\n"))
    with pytest.raises(HostfileError, match="device a: clock=work times an emulated device's work; this one is not"):
        parse_hostfile(_hosts(tmp_path, "# device: name=a clock=work\nh:1\n"))


def test_work_clock_devices_share_one_calibration():
    # each unit's least time per unit of slowdown over the clock=work devices of one precision, times
    # each one's slowdown; a unit a device cannot hold (None) stays None and leaves the others'
    # base alone; a CPU-clock device keeps what it measured, spreads included
    from edgeshard_mpi.profiler import _one_host_calibration

    class Spec:
        dtype, quantize = "float32", None

    devices = [Device(name="a", slowdown=2, clock="work"), Device(name="b", slowdown=4, clock="work"),
               Device(name="c", slowdown=3), Device(name="d", slowdown=2, clock="work", dtype="bfloat16")]

    def measured(rank, decode):
        return {"rank": rank, "decode_s": decode, "prefill_s": [10 * t if t else None for t in decode],
                "decode_step_s": 0.1 * rank, "prefill_step_s": 1.0, "decode_kv_s": 1e-9 * (rank + 1),
                "decode_spread": [0.2] * 2,
                "prefill_spread": [0.3] * 2}

    gathered = [measured(0, [2.2, 4.0]), measured(1, [4.0, None]), measured(2, [9.0, 9.0]), measured(3, [5.0, 5.0])]
    _one_host_calibration(gathered, devices, Spec())
    a, b, c, d = gathered
    assert a["decode_s"] == [2.0, 4.0] and b["decode_s"] == [4.0, None]  # min(2.2/2, 4/4) = 1.0 a unit of slowdown
    assert a["prefill_s"] == [20.0, 40.0] and b["prefill_s"] == [40.0, None]
    assert a["decode_step_s"] == 0.0 and b["decode_step_s"] == 0.0 and a["prefill_step_s"] == 0.5
    # min(1/2, 2/4) x each one's slowdown
    assert a["decode_kv_s"] == pytest.approx(1e-9) and b["decode_kv_s"] == pytest.approx(2e-9)
    assert a["decode_spread"] == [0.0, 0.0] and b["prefill_spread"] == [0.0, 0.0]
    assert c == measured(2, [9.0, 9.0])  # the CPU clock's figures are its own
    # alone in its precision: its own figures, which a run then takes exactly, so no spread
    assert d == {**measured(3, [5.0, 5.0]), "decode_spread": [0.0, 0.0], "prefill_spread": [0.0, 0.0]}


def test_cpu_clock_devices_on_one_host_spread_by_how_far_they_disagree():
    # each unit's time per unit of slowdown against the median of the CPU-clock emulated devices of
    # one precision; the larger of that and the repeats' spread; real devices, work-clock devices
    # and a device alone in its precision keep their own
    from edgeshard_mpi.profiler import _one_host_disagreement

    class Spec:
        dtype, quantize = "float32", None

    devices = [Device(name="board", slowdown=6), Device(name="mid", slowdown=4), Device(name="server", slowdown=3),
               Device(name="real"), Device(name="w", slowdown=2, clock="work"),
               Device(name="b16", slowdown=2, dtype="bfloat16")]

    def measured(rank, decode):
        return {"rank": rank, "decode_s": decode, "prefill_s": [8 * t if t else None for t in decode],
                "decode_spread": [0.05] * 2, "prefill_spread": [0.05] * 2}

    # per unit of slowdown, unit 0: 1.0, 0.75 (mid measured as fast as server would be), 1.0; unit 1:
    # 1.0, 1.02, None (did not fit)
    gathered = [measured(0, [6.0, 6.0]), measured(1, [3.0, 4.08]), measured(2, [3.0, None]),
                measured(3, [1.0, 1.0]), measured(4, [5.0, 5.0]), measured(5, [9.0, 9.0])]
    _one_host_disagreement(gathered, devices, Spec())
    board, mid, server, *rest = gathered
    assert mid["decode_spread"] == pytest.approx([0.25, 0.05]) and mid["prefill_spread"] == pytest.approx([0.25, 0.05])
    assert board["decode_spread"] == pytest.approx([0.05, 0.05])  # the median's own device
    assert server["decode_spread"] == pytest.approx([0.05, 0.05])
    assert rest == [measured(3, [1.0, 1.0]), measured(4, [5.0, 5.0]), measured(5, [9.0, 9.0])]


def test_emulated_devices_are_calibrated_and_compared_only_with_their_own_machines():
    # devices emulated on different machines time different CPUs: neither the work clock's shared
    # calibration nor the CPU clock's disagreement joins them
    from edgeshard_mpi.profiler import _one_host_calibration, _one_host_disagreement

    class Spec:
        dtype, quantize = "float32", None

    def measured(rank, decode):
        return {"rank": rank, "decode_s": decode, "prefill_s": list(decode), "decode_step_s": 0.1,
                "prefill_step_s": 0.1, "decode_kv_s": 0.0, "decode_spread": [0.05], "prefill_spread": [0.05]}

    work = [Device(name="a", slowdown=2, clock="work"), Device(name="b", slowdown=4, clock="work")]
    one, apart = [measured(0, [2.2]), measured(1, [4.0])], [measured(0, [2.2]), measured(1, [4.0])]
    _one_host_calibration(one, work, Spec(), ["m", "m"])
    _one_host_calibration(apart, work, Spec(), ["m", "n"])
    assert one[0]["decode_s"] == [2.0] and apart[0]["decode_s"] == [2.2]  # min(2.2/2, 4/4) x 2 on one machine only
    cpu = [Device(name="a", slowdown=2), Device(name="b", slowdown=4)]
    one, apart = [measured(0, [2.0]), measured(1, [6.0])], [measured(0, [2.0]), measured(1, [6.0])]
    _one_host_disagreement(one, cpu, Spec(), ["m", "m"])
    _one_host_disagreement(apart, cpu, Spec(), ["m", "n"])
    assert one[0]["decode_spread"][0] > 0.05 and apart[0]["decode_spread"] == [0.05]
