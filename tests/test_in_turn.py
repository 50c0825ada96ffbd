import pytest

from bench.in_turn import runs_in_turn


def test_cases_run_in_turn_each_round_in_a_process_of_its_own(capsys):
    def child(case):
        return ["-c", f"import json, os; print('noise'); print(json.dumps({{'case': '{case}', 'pid': os.getpid()}}))"]

    runs = runs_in_turn(["a", "b"], 2, child, lambda run: f"pid {run['pid']}")
    assert [(r["round"], r["case"]) for r in runs] == [(0, "a"), (0, "b"), (1, "a"), (1, "b")]
    assert len({r["pid"] for r in runs}) == 4
    assert capsys.readouterr().out.splitlines()[0].startswith("round 0 a: pid ")


def test_a_failing_case_ends_the_run_naming_it():
    with pytest.raises(SystemExit, match="the run with b failed"):
        runs_in_turn(["a", "b"], 1, lambda case: ["-c", f"import sys; print('{{}}'); sys.exit('{case}' == 'b')"],
                     lambda run: "")


def test_a_case_names_its_build_and_the_switches_it_turns():
    from bench.in_turn import parse_case
    assert parse_case("k.fatbin") == ("k.fatbin", [])
    fatbin, switches = parse_case("/tmp/k.fatbin:2@plugins.moe_experts.ROUTE_IN_GATE_UP=False,plugins.hc_pre.X=3")
    assert fatbin == "/tmp/k.fatbin:2"
    assert switches == [("plugins.moe_experts", "ROUTE_IN_GATE_UP", False), ("plugins.hc_pre", "X", 3)]
    for bad in ("k.fatbin@ROUTE_IN_GATE_UP=False", "k.fatbin@plugins.x.Y", "k.fatbin@plugins.x.Y=not python"):
        with pytest.raises(SystemExit):
            parse_case(bad)
