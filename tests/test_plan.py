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
