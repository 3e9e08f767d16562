from __future__ import annotations

import pytest

from edgeshard_mpi.planner import Plan, PlanError, Stage, even_plan


def test_even_plan_covers_every_unit_once():
    for n in range(1, 40):
        for r in range(1, 6):
            p = even_plan(n, r)
            assert [u for s in p.stages for u in s.units] == list(range(n))
            sizes = [len(s.units) for s in p.stages]
            assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("stages,needle", [
    ([(0, 0, 3), (1, 5, 7)], "misses unit(s) 4"),
    ([(0, 0, 4), (1, 4, 7)], "unit 4 is in stage 0 and stage 1"),
    ([(0, 0, 7), (0, 8, 9)], "units 0..7"),
    ([(1, 0, 3), (0, 4, 7)], "first stage must be rank 0"),
    ([(0, 0, 3), (0, 4, 7)], "more than one stage"),
    ([(0, 4, 7), (1, 0, 3)], "not in unit order"),
])
def test_bad_plans(stages, needle):
    with pytest.raises(PlanError) as e:
        Plan(tuple(Stage(*s) for s in stages), 8, source="x.json")
    assert needle in str(e.value) and "x.json" in str(e.value)


def test_plan_roundtrip(tmp_path):
    p = Plan((Stage(0, 0, 2), Stage(2, 3, 5), Stage(1, 6, 7)), 8)
    p.save(tmp_path / "p.json")
    assert Plan.load(tmp_path / "p.json", 8).stages == p.stages
    with pytest.raises(PlanError, match="plan is for 8 units, the model has 9"):
        Plan.load(tmp_path / "p.json", 9)
    with pytest.raises(PlanError, match="rank.*only 2 rank"):
        p.check_world(2)


def test_a_stage_with_an_unknown_key_is_refused():
    d = {"stages": [{"rank": 0, "first": 0, "last": 3}, {"rank": 1, "frist": 4, "first": 4, "last": 7}]}
    with pytest.raises(PlanError, match=r"job.toml: \[plan\]: stage 1 has unknown key\(s\) frist"):
        Plan.from_dict(d, 8, "job.toml: [plan]")


def test_profile_compare_names_what_moved(tmp_path, capsys):
    # one device 1.5x slower to decode and one link at half its bandwidth: the two largest moves, first
    import json

    from conftest import ROOT
    from edgeshard_mpi.cli import main

    old = ROOT / "profiles" / "paper-llama2-7b.json"
    d = json.loads(old.read_text())
    d["devices"][3]["decode_s"] = [1.5 * t for t in d["devices"][3]["decode_s"]]
    d["bandwidth"][0][14] = d["bandwidth"][14][0] = d["bandwidth"][0][14] / 2
    new = tmp_path / "new.json"
    new.write_text(json.dumps(d))
    assert main(["profile", "--compare", str(old), str(new)]) == 0
    lines = capsys.readouterr().out.splitlines()
    name3, name14 = d["devices"][3]["name"], d["devices"][14]["name"]
    top = sorted(lines[2:4])
    assert top[0].startswith(f"link {d['devices'][0]['name']} - {name14} bandwidth") and top[0].endswith("-50.0%")
    assert top[1].startswith(f"rank 3 {name3} decode") and top[1].endswith("+50.0%")
    assert lines[4].endswith("+0.0%")  # nothing else moved
    with pytest.raises(SystemExit):
        main(["profile"])  # neither a job nor --compare


def test_plan_prints_its_confidence_for_the_optima_only(capsys):
    # the paper's derived profile records no spreads: the optimum says it cannot know; a baseline,
    # which follows its rule whatever the figures, says nothing
    from conftest import ROOT
    from edgeshard_mpi.cli import main

    prof = str(ROOT / "profiles" / "paper-llama2-7b.json")
    assert main(["plan", "--profile", prof, "--objective", "throughput"]) == 0
    assert "confidence: unknown: the profile records no spreads" in capsys.readouterr().out
    assert main(["plan", "--profile", prof, "--objective", "even"]) == 0
    assert "confidence" not in capsys.readouterr().out
