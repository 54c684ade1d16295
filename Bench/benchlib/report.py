"""Ratios, goal checks and the two reports: OUT/report.json and OUT/report.md.

Every figure is "higher is better" (MiB/s, IOPS, ops/s, files/s), so a ratio is
subject ÷ baseline and > 1 means the subject is faster.
"""

import json
import os
import statistics

from .targets import TARGET_NAMES

WEFT_SUBJECTS = ("weft-embedded", "weft-remote", "weft-remote-tcp", "weft-embedded-relaxed")
BASELINES = ("juicefs-sqlite", "juicefs-sqlite-sync", "juicefs-redis", "local", "memfs")
FAMILY_TITLES = {
    "seqwrite": "Sequential write (fio, 1 MiB blocks, end_fsync)",
    "seqread": "Sequential read (fio, 1 MiB blocks)",
    "randread": "Random read (fio, 4 KiB, 1 job)",
    "metadata": "Metadata (mdbench: create, stat, unlink)",
    "smallfiles": "Small files (mdbench, 4 KiB each)",
    "fsync": "fsync-heavy appends (mdbench)",
}
SEQ_METRICS = ("seqwrite-1j", "seqwrite-4j", "seqread-cold-1j", "seqread-cold-4j")
COLD_RUNNING_METRICS = ("seqread-coldlive-1j", "seqread-coldlive-4j")
MD_METRICS = tuple(f"md-{phase}-{layout}" for layout in ("1dir", "100dirs", "100dirs-4t")
                   for phase in ("create", "stat", "unlink"))

# The goals: (id, goal text, subjects, metrics, baseline, minimum ratio)
GOALS = (
    ("fsmem-vs-memfs", "Weft memory-resident sequential read ≥ 80% of memfs (page cache dropped for both)",
     ("weft-embedded", "weft-remote"), ("seqread-fsmem-1j", "seqread-fsmem-4j"), "memfs", 0.8),
    ("seq-vs-juicefs-sqlite", "Weft cold sequential read and sequential write (end fsync) ≥ 1.5× juicefs-sqlite",
     ("weft-embedded", "weft-remote"), SEQ_METRICS, "juicefs-sqlite", 1.5),
    ("seq-vs-local", "Weft cold sequential read and sequential write (end fsync) ≥ 80% of local",
     ("weft-embedded", "weft-remote"), SEQ_METRICS, "local", 0.8),
    # The same cold reads with the agent left running: no restart, so no first touch of its
    # cache memory (see Bench/README.md, "Cold reads and agent memory").
    ("coldlive-vs-juicefs-sqlite", "Weft cold sequential read, agent left running (`weft cache drop`) "
     "≥ 1.5× juicefs-sqlite cold", ("weft-embedded", "weft-remote"), COLD_RUNNING_METRICS, "juicefs-sqlite", 1.5),
    ("coldlive-vs-local", "Weft cold sequential read, agent left running (`weft cache drop`) ≥ 80% of local cold",
     ("weft-embedded", "weft-remote"), COLD_RUNNING_METRICS, "local", 0.8),
    # "2× JuiceFS with SQLite at equal durability", at both levels JuiceFS+SQLite offers; the
    # metadata durability probe in the report shows the sync calls per create of each target.
    ("md-strict-vs-juicefs-sqlite-sync", "Metadata create/stat/unlink ≥ 2× JuiceFS+SQLite at equal durability: "
     "every change synced before it returns (Weft strict vs juicefs-sqlite-sync)",
     ("weft-embedded", "weft-remote"), MD_METRICS, "juicefs-sqlite-sync", 2.0),
    ("md-relaxed-vs-juicefs-sqlite", "Metadata create/stat/unlink ≥ 2× JuiceFS+SQLite at equal durability: "
     "changes written before they return, synced later (Weft periodic vs juicefs-sqlite's default)",
     ("weft-embedded-relaxed",), MD_METRICS, "juicefs-sqlite", 2.0),
    ("md-relaxed-vs-juicefs-redis", "Metadata create/stat/unlink ≥ 1.0× juicefs-redis (weft-embedded-relaxed)",
     ("weft-embedded-relaxed",), MD_METRICS, "juicefs-redis", 1.0),
)


# --- rounds (`Bench/run --rounds N`) ------------------------------------------------------------

def combine_rounds(round_results):
    """One results dict from several rounds': each cell's value is the median of the rounds that
    measured it, with `rounds` (each round's value, None where that round has none) and the other
    fields of the round closest to the median. A single round is returned as it is."""
    if len(round_results) == 1:
        return round_results[0]
    combined = {}
    workload_ids = list(dict.fromkeys(wid for results in round_results for wid in results))
    for workload_id in workload_ids:
        names = list(dict.fromkeys(name for results in round_results for name in results.get(workload_id, {})))
        for name in names:
            cells = [results.get(workload_id, {}).get(name) for results in round_results]
            values = [cell["value"] for cell in cells if cell and "value" in cell]
            if not values:
                combined.setdefault(workload_id, {})[name] = next(cell for cell in cells if cell)
                continue
            median = statistics.median(values)
            nearest = min((cell for cell in cells if cell and "value" in cell),
                          key=lambda cell: abs(cell["value"] - median))
            cell = dict(nearest, value=median,
                        rounds=[cell.get("value") if cell else None for cell in cells])
            if any(cell and "error" in cell for cell in cells):
                # Aligned with `rounds`: the error of each round that failed, None elsewhere.
                cell["round_errors"] = [cell.get("error") if cell else None for cell in cells]
            combined.setdefault(workload_id, {})[name] = cell
    return combined


def combine_rss_rounds(round_rss):
    """The bound is a maximum: the round with the highest peak stands for the run, with every
    round's peak in `rounds_peak_mib`."""
    if len(round_rss) == 1:
        return round_rss[0]
    combined = {}
    for name in dict.fromkeys(name for rss in round_rss for name in rss):
        entries = [rss.get(name) for rss in round_rss]
        measured = [entry for entry in entries if entry and "peak_mib" in entry]
        if not measured:
            combined[name] = next(entry for entry in entries if entry)
            continue
        combined[name] = dict(max(measured, key=lambda entry: entry["peak_mib"]),
                              rounds_peak_mib=[entry.get("peak_mib") if entry else None for entry in entries])
    return combined


def combine_target_states(previous, current, first):
    """A target's state over the rounds so far: its worst status (ok only if every round was),
    the first note, the seconds added up, and the busiest round's load average."""
    if first:
        return current
    state = dict(previous)
    rounds = state.pop("rounds", None) or [{key: previous.get(key) for key in
                                            ("status", "note", "seconds", "load_average_1min")}]
    rounds.append({key: current.get(key) for key in ("status", "note", "seconds", "load_average_1min")})
    state["rounds"] = rounds
    if previous.get("status") == "ok" and current.get("status") != "ok":
        state["status"] = current.get("status")
    if not state.get("note") and current.get("note"):
        state["note"] = current["note"]
    state["seconds"] = round(sum(entry.get("seconds") or 0 for entry in rounds), 1)
    loads = [entry["load_average_1min"] for entry in rounds if entry.get("load_average_1min")]
    if loads:
        state["load_average_1min"] = max(loads, key=lambda pair: max(pair))
    state["info"] = current.get("info", state.get("info"))
    return state


def paired_ratios(results, workload_id, subject, baseline):
    """Subject ÷ baseline within each round that measured both: targets of one round run minutes
    apart, so a pair shares the machine's state more than medians taken over the whole run do."""
    mine = results.get(workload_id, {}).get(subject) or {}
    theirs = results.get(workload_id, {}).get(baseline) or {}
    pairs = zip(mine.get("rounds") or [], theirs.get("rounds") or [])
    return [round(a / b, 3) for a, b in pairs if a is not None and b]


def value_of(results, workload_id, target):
    cell = results.get(workload_id, {}).get(target)
    return cell.get("value") if cell and "value" in cell else None


def compute_ratios(results, subjects):
    ratios = {}
    for workload_id in results:
        for subject in subjects:
            mine = value_of(results, workload_id, subject)
            if mine is None:
                continue
            for baseline in BASELINES:
                theirs = value_of(results, workload_id, baseline)
                if theirs and baseline != subject:
                    ratios.setdefault(workload_id, {}).setdefault(subject, {})[baseline] = round(mine / theirs, 3)
    return ratios


def _why_missing(targets, name):
    state = targets.get(name, {})
    status = state.get("status", "not selected")
    return f"{name} {status}" + (f": {state['note']}" if state.get("note") else "")


def evaluate_goals(results, rss, targets):
    """One entry per (goal, subject): status MET / NOT MET / NOT MEASURED with per-metric rows."""
    checks = []
    for goal_id, text, subjects, metrics, baseline, minimum in GOALS:
        for subject in subjects:
            rows, missing = [], []
            for metric in metrics:
                mine, theirs = value_of(results, metric, subject), value_of(results, metric, baseline)
                if mine is None or not theirs:
                    missing.append(metric)
                    continue
                ratio = mine / theirs
                per_round = paired_ratios(results, metric, subject, baseline)
                if per_round:
                    ratio = statistics.median(per_round)
                row = {"metric": metric, "value": mine, "baseline_value": theirs,
                       "ratio": round(ratio, 3), "required": minimum, "met": ratio >= minimum}
                if per_round:
                    row["round_ratios"] = per_round
                ceiling = value_of(results, metric, "memfs") if baseline != "memfs" else None
                if ceiling:
                    # memfs stores nothing and touches no disk: the most any FUSE file system
                    # reached in this run for this workload. A goal above it is out of reach here.
                    row["fuse_ceiling"] = ceiling
                    row["goal_above_ceiling"] = theirs * minimum > ceiling
                disk = disk_write_rate(results) if metric.startswith("seqwrite-") else None
                if disk and theirs * minimum > disk:
                    # Weft's fsync returns once the data is on the disk: it cannot write faster
                    # than the disk takes data. JuiceFS's `--storage file` fsync does not wait
                    # for the disk (METHOD_NOTES, Durability), so its figure can be above it.
                    row["disk_write_rate"] = disk
                    row["goal_above_disk"] = True
                rows.append(row)
            reason = None
            if not rows:
                absent = subject if value_of_any(results, subject) is None else baseline
                reason = _why_missing(targets, absent)
            checks.append(_check(goal_id, text, subject, baseline, rows, missing, reason))
    for subject in WEFT_SUBJECTS:
        entry = rss.get(subject)
        if subject in ("weft-embedded-relaxed", "weft-remote-tcp"):
            continue
        text = "Agent RSS within the configured bounds during the big write"
        if not entry or "peak_mib" not in entry:
            reason = entry.get("error") if entry else _why_missing(targets, subject)
            checks.append(_check("rss-bound", text, subject, None, [], ["rss"], reason))
            continue
        bound = entry["bound_with_allowance_mib"]
        rows = [{"metric": "peak RSS (MiB)", "value": entry["peak_mib"], "baseline_value": bound,
                 "ratio": round(entry["peak_mib"] / bound, 3), "required": "≤ 1.0",
                 "met": entry["peak_mib"] <= bound}]
        checks.append(_check("rss-bound", text, subject, "bound", rows, [], None))
    return checks


# Weft figures next to the disk's own direct-I/O rate measured on `local` in the same run
# (4 MiB O_DIRECT, the transfers Weft's chunk store issues): context for the goals against
# `local`, whose page-cache figures also move with the host's caching. Not goals.
DEVICE_PAIRS = tuple((f"{kind}-{jobs}j", f"{device}-{jobs}j")
                     for jobs in (1, 4)
                     for kind, device in (("seqread-cold", "seqread-odirect"), ("seqread-coldlive", "seqread-odirect"),
                                          ("seqwrite", "seqwrite-odirect")))


def device_context(results):
    """Rows of (subject, metric, Weft value, disk direct-I/O value, ratio) where both were measured."""
    rows = []
    for subject in ("weft-embedded", "weft-remote", "weft-remote-tcp"):
        for metric, device_metric in DEVICE_PAIRS:
            mine, disk = value_of(results, metric, subject), value_of(results, device_metric, "local")
            if mine is not None and disk:
                rows.append({"subject": subject, "metric": metric, "value": mine, "device_metric": device_metric,
                             "device_value": disk, "ratio": round(mine / disk, 3)})
    return rows


def metadata_floor(results):
    """Strict creates next to what this machine allows: the cheapest synced 4 KiB write (an
    overwrite of written blocks, `fsync-overwrite` on `local`, or an append, `fsync-append`, where
    that was not measured) plus FUSE's own cost of a create (`md-create-*` on memfs) per create,
    and the cost of one thread hand-off (`thread-handoff` on `local`). Context for the strict
    metadata goal, not a goal."""
    append, overwrite = value_of(results, "fsync-append", "local"), value_of(results, "fsync-overwrite", "local")
    handoff = value_of(results, "thread-handoff", "local")
    sync = max(v for v in (append, overwrite, 0) if v is not None) or None
    if not sync:
        return {}
    floor = {"sync_us": round(1e6 / sync, 1), "sync_kind": "fsync-overwrite" if sync == overwrite else "fsync-append",
             "append_us": round(1e6 / append, 1) if append else None,
             "handoff_us": round(1e6 / handoff, 1) if handoff else None, "rows": []}
    for layout in ("1dir", "100dirs"):  # one thread: one create after another
        metric = f"md-create-{layout}"
        fuse, juicefs = value_of(results, metric, "memfs"), value_of(results, metric, "juicefs-sqlite-sync")
        if not fuse:
            continue
        floor_us = 1e6 / sync + 1e6 / fuse
        for subject in ("weft-embedded", "weft-remote"):
            mine = value_of(results, metric, subject)
            if mine is None:
                continue
            floor["rows"].append({"subject": subject, "metric": metric, "value": mine, "us_per_op": round(1e6 / mine, 1),
                                  "fuse_us": round(1e6 / fuse, 1), "floor_us": round(floor_us, 1),
                                  "goal_value": round(2 * juicefs, 1) if juicefs else None,
                                  "goal_us": round(1e6 / (2 * juicefs), 1) if juicefs else None})
    return floor


def disk_write_rate(results):
    """The most the disk took in this run: fio's O_DIRECT 4 MiB writes on `local`, the higher of
    1 and 4 jobs (None when not measured)."""
    rates = [value_of(results, f"seqwrite-odirect-{jobs}j", "local") for jobs in (1, 4)]
    rates = [rate for rate in rates if rate]
    return max(rates) if rates else None


def value_of_any(results, target):
    for cells in results.values():
        if target in cells and "value" in cells[target]:
            return cells[target]["value"]
    return None


def _check(goal_id, text, subject, baseline, rows, missing, reason):
    failed = [row for row in rows if not row["met"]]
    if not rows:
        status = "NOT MEASURED"
    elif failed:
        above = sum(1 for row in failed if row.get("goal_above_ceiling"))
        above_disk = sum(1 for row in failed if row.get("goal_above_disk") and not row.get("goal_above_ceiling"))
        reasons = ([f"goal above the FUSE ceiling: {above}"] if above else []) + \
                  ([f"goal above the disk's write rate: {above_disk}"] if above_disk else [])
        status = "NOT MET" + (f" ({len(failed)} failed figures; {', '.join(reasons)})" if reasons else "")
    elif missing:
        status = f"MET ({len(rows)} of {len(rows) + len(missing)} measured)"
    else:
        status = "MET"
    return {"goal": goal_id, "text": text, "subject": subject, "baseline": baseline, "status": status,
            "rows": rows, "missing": missing, "reason": reason}


def write_json(path, report):
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(report, handle, indent=2, sort_keys=False)
        handle.write("\n")
    os.replace(temporary, path)


# --- Markdown ------------------------------------------------------------------------------------

def _number(value):
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _ratio(value):
    return "—" if value is None else f"{value:.2f}×"


def _cell(results, workload_id, target, errors):
    cell = results.get(workload_id, {}).get(target)
    if not cell:
        return "—"
    if "error" in cell:
        errors.append(f"{target} / {workload_id}: {cell['error']}")
        return f"ERR[{len(errors)}]"
    failed = [(index, error) for index, error in enumerate(cell.get("round_errors") or [], 1) if error]
    if failed:
        errors.append(f"{target} / {workload_id}: failed in round(s) {', '.join(str(i) for i, _ in failed)} "
                      f"(the figure is the median of the others): {failed[0][1]}")
        return f"{_number(cell['value'])} ERR[{len(errors)}]"
    return _number(cell["value"])


def _table(header, rows, align=None):
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _durability_probe_table(results, columns, workload_id, what):
    """What an fsync or a create on the mount costs underneath: sync calls by the file system's processes."""
    rows = []
    for name in columns:
        probe = results.get(workload_id, {}).get(name, {}).get("extra", {}).get("durability_probe")
        if not probe:
            continue
        if "per_operation" in probe:
            calls = ", ".join(f"{call} {count}" for call, count in sorted(probe["by_call"].items())) or "none"
            rows.append([name, probe["operations"], probe["sync_syscalls"], f"{probe['per_operation']:.2f}", calls])
        else:
            rows.append([name, "—", "—", "—", probe.get("note") or probe.get("error", "")])
    if not rows:
        return ""
    return (f"Durability probe (strace, separate from the timed loop): sync system calls made by each file "
            f"system's own processes while the application did N {what}. 0 per operation means the operation "
            "does not reach stable storage when it returns.\n\n"
            + _table(["Target", f"App {what}", "Sync syscalls", "Per operation", "Calls"], rows,
                     ["---", "---:", "---:", "---:", "---"]))


def render_markdown(report):
    results, workloads, targets = report["results"], report["workloads"], report["targets"]
    columns = [name for name in TARGET_NAMES if targets.get(name, {}).get("status") != "not selected"]
    subjects = report["subjects"]
    out = [f"# Weft benchmark report — {report['started_at']}", ""]
    rounds = report.get("rounds", 1)
    out.append(f"Mode **{report['mode']}**"
               + (f", **{rounds} rounds** (each figure the median of its rounds, each goal ratio the median of the "
                  "rounds' paired ratios)" if rounds > 1 else "")
               + f", status **{report['status']}**, "
               f"{report.get('duration_seconds', 0):.0f} s. Command: `{' '.join(report['command'])}`")
    load = report.get("load_average", {})
    cpus = report["environment"].get("cpu_count") or 1
    busy = {name: state["load_average_1min"] for name, state in targets.items()
            if max(state.get("load_average_1min") or [0]) > 0.5 * cpus}
    if busy:
        detail = ", ".join(f"{name} {before:.1f}→{after:.1f}" for name, (before, after) in busy.items())
        out += ["", f"> **Warning:** other processes were using the {cpus} CPUs during this run (1-minute load "
                    f"average before→after each target: {detail}). Figures taken on a busy machine are noisy; "
                    "rerun on an idle machine before drawing conclusions."]
    out += ["", "## Targets", "", "The issue's goals, checked on this run's figures "
            "(ratio = Weft ÷ baseline; every figure is higher-is-better).", ""]
    rows = []
    for check in report["checks"]:
        if check["rows"]:
            detail = "; ".join(f"{row['metric']} {_number(row['value'])} vs {_number(row['baseline_value'])} "
                               f"= {row['ratio']:.2f}"
                               + (f" (rounds {', '.join(f'{r:.2f}' for r in row['round_ratios'])})"
                                  if row.get("round_ratios") else "")
                               + (f" (goal {_number(row['baseline_value'] * row['required'])} > memfs "
                                  f"{_number(row['fuse_ceiling'])})" if row.get("goal_above_ceiling") else "")
                               + (f" (goal {_number(row['baseline_value'] * row['required'])} > disk "
                                  f"{_number(row['disk_write_rate'])})" if row.get("goal_above_disk") else "")
                               for row in check["rows"])
        else:
            detail = check.get("reason") or ""
        if check["missing"] and check["rows"]:
            detail += f"; not measured: {', '.join(check['missing'])}"
        rows.append([check["text"], check["subject"], f"**{check['status']}**", detail])
    out.append(_table(["Goal", "Subject", "Status", "Figures"], rows, ["---", "---", "---", "---"]))
    if any(row.get("goal_above_ceiling") for check in report["checks"] for row in check["rows"]):
        out += ["", "\"goal above the FUSE ceiling\": the goal's figure (baseline × required ratio) is higher than "
                "what memfs, which keeps everything in memory and stores nothing, got for the same workload in "
                "this run. No FUSE file system that also writes or reads the disk reaches it on this machine in "
                "this run; such a row is out of reach here rather than a shortfall of Weft's path."]
    if any(row.get("goal_above_disk") for check in report["checks"] for row in check["rows"]):
        out += ["", "\"goal above the disk's write rate\": the goal's figure is higher than what the disk itself "
                "took in this run (fio, 4 MiB O_DIRECT writes on `local`, the higher of 1 and 4 jobs). Weft's "
                "fsync returns once the data is on the disk, so no Weft figure can pass it; JuiceFS with "
                "`--storage file` writes its blocks into the page cache and does not sync them (Method, "
                "Durability), so its figure, and a goal that multiplies it, can."]
    context = report.get("device_context") or []
    if context:
        out += ["", "## Weft against the disk's own rate (context, not goals)", "",
                "The same disk read and written by fio with 4 MiB O_DIRECT transfers (what Weft's chunk store "
                "issues) in this run, on `local`. The `local` figures above go through the page cache, whose speed "
                "on this VM also follows the host's caching; this is what a store that bypasses the page cache "
                "gets from the disk.", ""]
        rows = [[row["subject"], f"`{row['metric']}`", _number(row["value"]), f"`{row['device_metric']}`",
                 _number(row["device_value"]), f"{row['ratio']:.2f}"] for row in context]
        out.append(_table(["Subject", "Weft workload", "Weft MiB/s", "Disk workload", "Disk MiB/s", "Ratio"], rows,
                          ["---", "---", "---:", "---", "---:", "---:"]))

    floor = report.get("metadata_floor") or {}
    if floor.get("rows"):
        handoff = f"{floor['handoff_us']:.1f} µs" if floor.get("handoff_us") else "not measured"
        out += ["", "## Strict creates against the machine's floor (context, not goals)", "",
                f"The cheapest synced 4 KiB write on this disk took {floor['sync_us']:.1f} µs "
                f"(`{floor.get('sync_kind', 'fsync-append')}` on `local`"
                + (f"; an append + fsync {floor['append_us']:.1f} µs" if floor.get("append_us") else "") + "); "
                f"one thread hand-off round trip {handoff} (`thread-handoff`). A strict create needs at least one "
                "synced write plus what FUSE itself costs per create (memfs, which stores nothing), one thread "
                "after another, so `floor` is the least time per create (one thread) any FUSE file system with "
                "durable creates can take here; every hand-off between threads on the way (a client's event "
                "loop, a hub's worker) adds to it. Goal = 2× juicefs-sqlite-sync.", ""]
        rows = [[row["subject"], f"`{row['metric']}`", _number(row["value"]), f"{row['us_per_op']:.0f}",
                 f"{row['fuse_us']:.0f}", f"{row['floor_us']:.0f}",
                 _number(row["goal_value"]) if row["goal_value"] else "—",
                 f"{row['goal_us']:.0f}" if row["goal_us"] else "—"] for row in floor["rows"]]
        out.append(_table(["Subject", "Workload", "Weft ops/s", "Weft µs/op", "FUSE µs/op (memfs)",
                           "Floor µs/op (FUSE + sync)", "Goal ops/s", "Goal µs/op"], rows,
                          ["---", "---", "---:", "---:", "---:", "---:", "---:", "---:"]))

    out += ["", "## Systems under test", ""]
    rows = [[name, targets[name]["status"], targets[name].get("description", ""), targets[name].get("note") or ""]
            for name in TARGET_NAMES if name in targets]
    out.append(_table(["Target", "Status", "What", "Note"], rows, ["---"] * 4))

    errors = []
    for family, title in FAMILY_TITLES.items():
        ids = [wid for wid, meta in workloads.items() if meta["family"] == family]
        if not ids:
            continue
        unit = workloads[ids[0]]["unit"]
        out += ["", f"## {title}", "", f"Values in {unit} (higher is better)."
                + (" Extra columns: MiB/s are in report.json." if family in ("smallfiles", "randread") else ""), ""]
        rows = [[f"`{wid}` {workloads[wid]['title']}"] + [_cell(results, wid, name, errors) for name in columns]
                for wid in ids]
        out.append(_table(["Workload"] + columns, rows))
        ratio_rows = []
        for wid in ids:
            for subject in subjects:
                ratios = report["ratios"].get(wid, {}).get(subject)
                if ratios:
                    ratio_rows.append([f"`{wid}`", subject] + [_ratio(ratios.get(base)) for base in BASELINES])
        if ratio_rows:
            out += ["", "Ratios (subject ÷ baseline):", ""]
            out.append(_table(["Workload", "Subject"] + [f"÷ {base}" for base in BASELINES], ratio_rows,
                              ["---", "---"] + ["---:"] * len(BASELINES)))
        elif family == "seqwrite":
            out += ["", "_No Weft target produced figures in this run, so there are no Weft ratios._"]
        if family == "fsync":
            out += ["", _durability_probe_table(results, columns, "fsync-append", "appends + fsync")]
        if family == "metadata":
            out += ["", _durability_probe_table(results, columns, "md-durability-probe", "creates")]
    if errors:
        out += ["", "## Errors", ""] + [f"{index}. {text}" for index, text in enumerate(errors, 1)]

    if rounds > 1:
        out += ["", "## Every round", "", "Each target's figure in each round (the tables above show their "
                "medians); targets ran forward in odd rounds and in reverse in even ones.", ""]
        rows = []
        for wid in workloads:
            for name in columns:
                cell = results.get(wid, {}).get(name)
                if cell and cell.get("rounds"):
                    failed = cell.get("round_errors") or []
                    shown = ["ERR" if index < len(failed) and failed[index] else _number(value)
                             for index, value in enumerate(cell["rounds"])]
                    # Rounds not run yet (a report written during the run, or an interrupted one).
                    rows.append([f"`{wid}`", name] + shown + ["—"] * (rounds - len(shown)))
        out.append(_table(["Workload", "Target"] + [f"round {index}" for index in range(1, rounds + 1)], rows,
                          ["---", "---"] + ["---:"] * rounds))

    out += ["", "## Agent RSS during a large write", ""]
    if report["rss"]:
        rows = []
        for name, entry in report["rss"].items():
            if "peak_mib" not in entry:
                rows.append([name, "—", "—", "—", "—", "—", "—", entry.get("error", "")])
                continue
            rows.append([name, f"{entry['write_mib']} MiB", _number(entry["write_mib_per_sec"]),
                         f"{entry['configured_bound_mib']} + {entry['allowance_mib']}",
                         _number(entry["vmhwm_mib"]), _number(entry["max_vmrss_mib"]),
                         _number(entry.get("hub_max_vmrss_mib")),
                         "within bound" if entry["peak_mib"] <= entry["bound_with_allowance_mib"] else "OVER bound"])
        out.append(_table(["Target", "Written", "Write MiB/s", "Bound MiB (buffer+cache + allowance)",
                           "VmHWM MiB", "max VmRSS MiB", "weftd max VmRSS MiB", "Result"], rows))
    else:
        out.append("_Not measured: needs a Weft target (`--write-buffer-mb` / `--cache-mb` and `--pid-file`)._")

    env = report["environment"]
    out += ["", "## Environment", ""]
    rows = [["kernel", env.get("kernel")], ["CPU", f"{env.get('cpu_model')} × {env.get('cpu_count')}"],
            ["memory", f"{env.get('memory_gib')} GiB"],
            ["work dir", f"{env.get('work_dir')} ({env.get('work_dir_filesystem')})"],
            ["transparent huge pages", env.get("transparent_hugepage")],
            ["fs.pipe-max-size (Deploy/weft-tune)", env.get("pipe_max_size")], ["load average start / end",
             f"{load.get('start')} / {load.get('end')}"]]
    rows += [[name, version or "—"] for name, version in env.get("versions", {}).items()]
    out.append(_table(["Item", "Value"], rows, ["---", "---"]))
    out += ["", "## Method", ""] + [f"- {line}" for line in METHOD_NOTES] + [""]
    return "\n".join(out)


METHOD_NOTES = (
    "All targets run the same fio/mdbench commands with the same sizes, one target at a time, on the same disk.",
    "Before each family every target settles, untimed: `sync`, and for Weft until its chunk count has not changed "
    "for 1.5 s (its GC deletes the objects of the files the previous family removed; JuiceFS keeps removed files' "
    "data in its trash instead). Without it the first metadata loop after the data families ran into that "
    "deletion (embedded md-create-1dir 3,214 against 5,104 settled, 2026-12-05).",
    "fio: ioengine psync, `--direct=0` (except randread-4k-direct), `--fallocate=none`, group reporting; "
    "throughput = io_bytes / runtime, which for writes includes the final fsync (`--end_fsync=1`).",
    "cold = `sync; echo 3 > /proc/sys/vm/drop_caches` and a remount (JuiceFS also empties its disk cache dir; "
    "weft-remote also restarts weftd). local and memfs cannot be remounted (memfs would lose its data), "
    "so for them cold is the cache drop alone.",
    "warm = read again at once. On FUSE, whether that is served by the page cache depends on the file system's "
    "keep-cache choice on open, so warm figures compare each system's own re-read path.",
    "Every sequential write starts after `sync` and a page-cache drop. memfs touches the memory for all "
    "sequential files before it mounts (`--prefault-mb`), so its writes measure FUSE and the copy, not the "
    "kernel's first-touch page faults, which are slow on this virtual machine.",
    "fsmem = read, drop the page cache only (no remount), read again: data held in the file system's own memory. "
    "For memfs that is all of its data; it is the FUSE ceiling the Weft figure is compared with. Weft's agent "
    "is first remounted with a block cache that holds the files (`--cache-mb`, files + 1/8 + 64 MiB; the "
    "default 1 GiB holds less than the 4-job files) and reads them once, unmeasured.",
    "coldlive = cold with the file system left running: for Weft `weft cache drop` (the agent empties its block "
    "cache and keeps the memory) and a page-cache drop, and for weft-remote weftd's read cache emptied too "
    "(SIGUSR1); the others go cold as in cold. A remount makes Weft's "
    "agent fill its cache with never-touched memory, which this VM's host populates page by page "
    "(Bench/README.md, Cold reads and agent memory).",
    "metadata: mdbench (Bench/mdbench) create = open(O_CREAT|O_EXCL)+close, stat after dropping dentries and inodes "
    "so every stat reaches the file system, unlink; one process, 1 or 4 threads.",
    "JuiceFS: `juicefs format --storage file --trash-days 0` (trash off, so unlink really deletes), "
    "mount -d with default "
    "options (128 KiB FUSE requests, 300 MiB buffer, 1 s attr/entry cache) except cache dir/log in the work dir and "
    "--no-usage-report. Extra options: `--juicefs-mount-args`.",
    "Durability: JuiceFS `--storage file` writes blocks without fsync and its SQLite metadata uses WAL without a "
    "sync per transaction (see the durability probe under fsync appends): its fsync is not a power-loss barrier, "
    "while Weft strict syncs before it replies. Write-and-fsync comparisons therefore favour JuiceFS.",
    "Redis: redis-server on a free 127.0.0.1 port with its own dir, default durability (appendonly no, default "
    "RDB save schedule).",
    "Weft: formatted with `--compression none` by default (fio's buffers repeat, so zstd would shrink them and "
    "flatter Weft; JuiceFS compresses nothing by default). Change with `--weft-compression`.",
    "Rounds (`--rounds N`): every selected target runs N times, forward in odd rounds and reversed in even ones, "
    "each time from a fresh format. A figure is the median of its rounds; a goal's ratio is the median of the "
    "ratios taken within each round (subject ÷ baseline of the same round), since the two ran minutes apart; "
    "the RSS peak is the highest round's. Every round's figure is in report.json (`rounds`) and in "
    "\"Every round\" below.",
    "RSS: a fresh mount with `--write-buffer-mb 256 --cache-mb 512`; VmRSS sampled every 100 ms and VmHWM read "
    "from /proc/PID/status; the bound is buffer + cache plus a runtime allowance (`--rss-allowance-mb`).",
)
