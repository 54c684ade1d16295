"""Bench/run --rounds: how several rounds' figures become one report (Bench/benchlib/report.py).

Pure functions over report dicts; no mount. The figures are made up so that the median of the
values and the median of the paired ratios disagree, which is what the goal check must follow.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "Bench"))

from benchlib import report as reporting  # noqa: E402


def _cell(value):
    return {"value": value, "unit": "MiB/s", "extra": {"v": value}}


def _rounds():
    # Round 2 ran on a slow machine for both targets: its paired ratio is as good as the others'.
    return [
        {"seqwrite-1j": {"weft-embedded": _cell(900.0), "juicefs-sqlite": _cell(500.0)}},
        {"seqwrite-1j": {"weft-embedded": _cell(300.0), "juicefs-sqlite": _cell(180.0)}},
        {"seqwrite-1j": {"weft-embedded": _cell(700.0), "juicefs-sqlite": {"error": "fio failed"}}},
    ]


def test_a_single_round_is_reported_as_it_was_measured():
    only = [{"seqwrite-1j": {"weft-embedded": _cell(900.0)}}]
    assert reporting.combine_rounds(only) is only[0]
    assert "rounds" not in reporting.combine_rounds(only)["seqwrite-1j"]["weft-embedded"]


def test_figures_are_medians_with_every_round_kept():
    combined = reporting.combine_rounds(_rounds())
    weft = combined["seqwrite-1j"]["weft-embedded"]
    assert weft["value"] == 700.0
    assert weft["rounds"] == [900.0, 300.0, 700.0]
    assert weft["extra"] == {"v": 700.0}
    juicefs = combined["seqwrite-1j"]["juicefs-sqlite"]
    assert juicefs["value"] == 340.0  # median of the two rounds that measured it
    assert juicefs["rounds"] == [500.0, 180.0, None]
    assert juicefs["round_errors"] == [None, None, "fio failed"]


def test_a_target_that_failed_in_every_round_keeps_its_error():
    rounds = [{"seqwrite-1j": {"weft-remote": {"error": "mount failed"}}},
              {"seqwrite-1j": {"weft-remote": {"error": "again"}}}]
    assert reporting.combine_rounds(rounds)["seqwrite-1j"]["weft-remote"] == {"error": "mount failed"}


def test_goal_ratios_are_the_median_of_the_rounds_paired_ratios():
    combined = reporting.combine_rounds(_rounds())
    assert reporting.paired_ratios(combined, "seqwrite-1j", "weft-embedded", "juicefs-sqlite") == [1.8, 1.667]
    checks = reporting.evaluate_goals(combined, {}, {})
    row = next(check for check in checks
               if check["goal"] == "seq-vs-juicefs-sqlite" and check["subject"] == "weft-embedded")["rows"][0]
    # 700 / 340 = 2.06 from the medians; the paired ratios give 1.73, which the goal uses.
    assert row["round_ratios"] == [1.8, 1.667]
    assert row["ratio"] == round((1.8 + 1.667) / 2, 3)
    assert row["met"] is True


def test_a_round_below_the_goal_moves_the_median_ratio_below_it():
    rounds = [{"seqwrite-1j": {"weft-embedded": _cell(value), "juicefs-sqlite": _cell(base)}}
              for value, base in ((800.0, 500.0), (700.0, 500.0), (900.0, 500.0))]
    checks = reporting.evaluate_goals(reporting.combine_rounds(rounds), {}, {})
    row = next(check for check in checks
               if check["goal"] == "seq-vs-juicefs-sqlite" and check["subject"] == "weft-embedded")["rows"][0]
    assert row["ratio"] == 1.6 and row["met"] is True
    rounds[0]["seqwrite-1j"]["weft-embedded"] = _cell(600.0)
    rounds[2]["seqwrite-1j"]["weft-embedded"] = _cell(740.0)
    checks = reporting.evaluate_goals(reporting.combine_rounds(rounds), {}, {})
    row = next(check for check in checks
               if check["goal"] == "seq-vs-juicefs-sqlite" and check["subject"] == "weft-embedded")["rows"][0]
    assert row["ratio"] == 1.4 and row["met"] is False


def test_rss_keeps_the_highest_round_and_states_keep_the_worst_status():
    rss = reporting.combine_rss_rounds([{"weft-embedded": {"peak_mib": 700.0}},
                                        {"weft-embedded": {"peak_mib": 900.0}},
                                        {"weft-embedded": {"error": "oom"}}])
    assert rss["weft-embedded"]["peak_mib"] == 900.0
    assert rss["weft-embedded"]["rounds_peak_mib"] == [700.0, 900.0, None]
    state = reporting.combine_target_states({}, {"status": "ok", "seconds": 10.0, "load_average_1min": [0.2, 1.0]},
                                            first=True)
    state = reporting.combine_target_states(state, {"status": "failed", "note": "mount timed out", "seconds": 5.0,
                                                    "load_average_1min": [1.0, 3.5]}, first=False)
    state = reporting.combine_target_states(state, {"status": "ok", "seconds": 12.0,
                                                    "load_average_1min": [0.4, 0.9]}, first=False)
    assert state["status"] == "failed"
    assert state["note"] == "mount timed out"
    assert state["seconds"] == 27.0
    assert state["load_average_1min"] == [1.0, 3.5]
    assert [entry["status"] for entry in state["rounds"]] == ["ok", "failed", "ok"]


def test_a_write_goal_above_the_disks_own_rate_is_marked():
    results = {"seqwrite-1j": {"weft-embedded": _cell(900.0), "juicefs-sqlite": _cell(950.0)},
               "seqwrite-4j": {"weft-embedded": _cell(880.0), "juicefs-sqlite": _cell(500.0)},
               "seqwrite-odirect-1j": {"local": _cell(1200.0)},
               "seqwrite-odirect-4j": {"local": _cell(1300.0)}}
    check = next(check for check in reporting.evaluate_goals(results, {}, {})
                 if check["goal"] == "seq-vs-juicefs-sqlite" and check["subject"] == "weft-embedded")
    one, four = check["rows"]
    assert one["goal_above_disk"] is True and one["disk_write_rate"] == 1300.0   # 1,425 > 1,300
    assert "goal_above_disk" not in four                                          # 750 < 1,300
    assert check["status"] == "NOT MET (1 failed figures; goal above the disk's write rate: 1)"


def test_a_round_that_failed_shows_in_the_report():
    report = {"results": reporting.combine_rounds(_rounds()), "rounds": 3, "ratios": {}, "subjects": [],
              "checks": [], "rss": {}, "environment": {}, "load_average": {}, "started_at": "now", "mode": "quick",
              "status": "complete", "command": ["Bench/run"],
              "targets": {"weft-embedded": {"status": "ok"}, "juicefs-sqlite": {"status": "ok"}},
              "workloads": {"seqwrite-1j": {"family": "seqwrite", "title": "write", "unit": "MiB/s"}}}
    text = reporting.render_markdown(report)
    assert "340 ERR[1]" in text
    assert "juicefs-sqlite / seqwrite-1j: failed in round(s) 3" in text
    assert "| `seqwrite-1j` | juicefs-sqlite | 500 | 180 | ERR |" in text
