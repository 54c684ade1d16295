"""Bench/run: command line, orchestration and the guarantee that everything is cleaned up."""

import argparse
import os
import shlex
import signal
import sys
import tempfile
import time
from types import SimpleNamespace

from . import report as reporting
from . import tools
from .system import BenchError, Cleanup, install_signal_handlers, log
from .targets import ALL_FAMILIES, TARGET_NAMES, TargetUnavailable, make_targets
from .workloads import Parameters, Runner, catalogue


def parse_arguments(argv):
    parser = argparse.ArgumentParser(
        prog="Bench/run",
        description="Run the same file-system workloads on local, memfs, JuiceFS and Weft side by side "
                    "and write OUT/report.md and OUT/report.json.")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a few minutes")
    parser.add_argument("--out", help="output directory (default Bench/results/<timestamp>)")
    parser.add_argument("--only", help=f"comma-separated targets (default all): {','.join(TARGET_NAMES)}")
    parser.add_argument("--workloads", help=f"comma-separated workload families (default all): "
                                            f"{','.join(ALL_FAMILIES)}")
    parser.add_argument("--weft-bin", help="directory with weft and weftd "
                                           "(default: `swift build -c release --show-bin-path`)")
    parser.add_argument("--work-dir", help="where targets keep data and mountpoints (default: a new temp dir "
                                           "under /var/tmp, the same disk as local); removed at the end")
    parser.add_argument("--keep-work", action="store_true", help="do not delete the work dir at the end")
    parser.add_argument("--mount-timeout", type=float, default=60, help="seconds to wait for a mount (default 60)")
    parser.add_argument("--timeout-scale", type=float, default=1.0,
                        help="multiply every workload's time limit (default 1.0)")
    parser.add_argument("--weft-compression", default="none", choices=("none", "zstd"),
                        help="`weft format --compression` (default none, like JuiceFS)")
    parser.add_argument("--weft-mount-args", default="", help="extra arguments for every `weft mount`")
    parser.add_argument("--juicefs-mount-args", default="", help="extra arguments for every `juicefs mount`")
    parser.add_argument("--rss-allowance-mb", type=int, help="RSS allowed above write buffer + cache (default 256)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every selected target this many times, in alternating order (forward, then "
                             "reversed); each figure is the median of its rounds and each goal ratio the median of "
                             "the rounds' paired ratios (default 1)")
    parser.add_argument("--compare-as", help="targets to treat as ratio subjects (default: the Weft targets)")
    parser.add_argument("--report-only", metavar="OUT", help="re-render OUT/report.md from OUT/report.json, the goals checked again with this Bench's rules, and exit")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.rounds > 1 and args.keep_work:
        parser.error("--keep-work keeps each target's data, so a later round could not start from a fresh "
                     "format: use one of --rounds and --keep-work")
    return args


def _split_names(text, allowed, what):
    if not text:
        return list(allowed)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise SystemExit(f"Bench/run: unknown {what} {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return [name for name in allowed if name in names]


class Session:
    """One benchmark run: builds the context, runs targets in order, keeps the report current."""

    def __init__(self, args, argv):
        self.args = args
        self.started = time.time()
        self.params = Parameters.quick() if args.quick else Parameters()
        if args.rss_allowance_mb is not None:
            self.params.rss_allowance_mb = args.rss_allowance_mb
        self.selected = _split_names(args.only, TARGET_NAMES, "target")
        self.families = _split_names(args.workloads, ALL_FAMILIES, "workload family")
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.started))
        self.out_dir = os.path.abspath(args.out or os.path.join(tools.BENCH_DIR, "results", stamp))
        self.results, self.rss, self.target_states = {}, {}, {}
        self.round_results, self.round_rss = [], []
        self.environment = {}
        self.load_start = tools.loadavg()
        self.status = "running"
        self.report = {
            "schema_version": 1,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "mode": "quick" if args.quick else "full",
            "rounds": args.rounds,
            "command": ["Bench/run", *argv],
        }

    def _context(self):
        args = self.args
        os.makedirs(self.out_dir, exist_ok=True)
        work_dir = os.path.abspath(args.work_dir) if args.work_dir else tempfile.mkdtemp(prefix="weft-bench-",
                                                                                       dir="/var/tmp")
        os.makedirs(work_dir, exist_ok=True)
        if not args.keep_work:
            Cleanup.add(f"remove {work_dir}", lambda: tools.remove_tree(work_dir))
        log_dir = os.path.join(self.out_dir, "logs")
        os.makedirs(log_dir, exist_ok=True)
        context = SimpleNamespace(
            work_dir=work_dir, out_dir=self.out_dir, log_dir=log_dir, mount_timeout=args.mount_timeout,
            timeout_scale=args.timeout_scale, weft_compression=args.weft_compression,
            weft_mount_args=shlex.split(args.weft_mount_args), juicefs_mount_args=shlex.split(args.juicefs_mount_args),
            memfs_path=None, mdbench_path=None, juicefs_path=None, weft_path=None, weftd_path=None,
            weft_missing_note=None, weft_mount_help="", memfs_prefault_mib=self._memfs_prefault_mib())
        wants = set(self.selected)
        tools.ensure_system_packages(need_redis="juicefs-redis" in wants)
        context.mdbench_path = tools.build_mdbench()
        if "memfs" in wants:
            context.memfs_path = tools.build_memfs()
        if any(name.startswith("juicefs") for name in wants):
            context.juicefs_path = tools.ensure_juicefs()
        weft_dir = None
        if any(name.startswith("weft") for name in wants):
            tools.apply_weft_tuning()
            weft_dir, note = tools.weft_bin_dir(args.weft_bin)
            context.weft_path, context.weftd_path, missing = tools.find_weft_binaries(weft_dir)
            context.weft_missing_note = note or missing
            if context.weft_path:
                context.weft_mount_help = tools.help_text([context.weft_path, "mount", "--help"])
        self.environment = tools.environment(work_dir, context.juicefs_path, weft_dir)
        self.environment["weft_bin_dir"] = weft_dir
        return context

    def _memfs_prefault_mib(self):
        """memfs holds every sequential file at once: touch that much memory before mounting, leaving
        at least 4 GiB of the machine's available memory for the page cache and the tools."""
        params = self.params
        wanted = sum(params.seq_jobs) * params.seq_file_mib
        available = tools.memory_available_mib()
        return int(max(0, min(wanted, available - 4096))) if available else wanted

    def run(self):
        context = self._context()
        free_gib = tools.disk_free_gib(context.work_dir)
        log(f"work dir {context.work_dir} ({free_gib:.0f} GiB free), output {self.out_dir}")
        params = self.params
        needed_gib = (sum(params.seq_jobs) * params.seq_file_mib + params.randread_file_mib
                      + params.rss_write_mib) / 1024 + 2
        self.environment["disk_free_gib"] = round(free_gib, 1)
        if free_gib < needed_gib:
            log(f"WARNING: {free_gib:.0f} GiB free in the work dir, about {needed_gib:.0f} GiB needed")
        targets = make_targets(context)
        for target in targets:
            state = {"description": target.description, "status": "not selected"}
            self.target_states[target.name] = state
        for index in range(self.args.rounds):
            results, rss = {}, {}
            self.round_results.append(results)
            self.round_rss.append(rss)
            label = f"round-{index + 1}" if self.args.rounds > 1 else None
            runner = Runner(context, self.params, results, rss, self.families, label)
            # Alternate the order so that no target always runs first (on a fresh machine) or last.
            for target in (targets if index % 2 == 0 else list(reversed(targets))):
                if target.name in self.selected:
                    if label:
                        log(f"--- {label} of {self.args.rounds}")
                    self._run_target(target, runner)
                    self.results = reporting.combine_rounds(self.round_results)
                    self.rss = reporting.combine_rss_rounds(self.round_rss)
                    self.write_reports()

    def _run_target(self, target, runner):
        state = {"description": target.description, "status": "running"}
        try:
            self._run_target_once(target, runner, state)
        finally:
            self.target_states[target.name] = reporting.combine_target_states(
                self.target_states[target.name], state, first=len(self.round_results) == 1)

    def _run_target_once(self, target, runner, state):
        try:
            target.check_available()
        except TargetUnavailable as reason:
            state.update(status="skipped", note=str(reason))
            log(f"{target.name}: skipped: {reason}")
            return
        log(f"=== {target.name}: {target.description}")
        started = time.monotonic()
        load_before = tools.loadavg()
        try:
            target.setup()
            target.mount()
            os.makedirs(os.path.join(target.mountpoint, "bench"), exist_ok=True)
            runner.run_target(target)
            state["status"] = "ok"
        except BenchError as error:
            message = str(error).strip()
            log(f"{target.name}: FAILED: {message}")
            state.update(status="failed", note=message.splitlines()[0][:400])
        except KeyboardInterrupt:
            log(f"{target.name}: interrupted: stopping workloads and unmounting")
            state.update(status="interrupted")
            raise
        finally:
            Cleanup.stop_children()
            state["info"] = target.info
            state["seconds"] = round(time.monotonic() - started, 1)
            load_after = tools.loadavg()
            if load_before and load_after:
                state["load_average_1min"] = [load_before[0], load_after[0]]
            try:
                target.teardown()
            except BenchError as error:
                log(f"{target.name}: teardown: {error}")
            if not self.args.keep_work:
                tools.remove_tree(target.root)
        failures = [wid for wid, cells in runner.results.items() if "error" in cells.get(target.name, {})]
        if state["status"] == "ok" and failures:
            state["note"] = f"{len(failures)} workload(s) failed: {', '.join(failures[:6])}"

    def write_reports(self):
        finished = time.time()
        subjects = (_split_names(self.args.compare_as, TARGET_NAMES, "target") if self.args.compare_as
                    else [name for name in reporting.WEFT_SUBJECTS if reporting.value_of_any(self.results, name)])
        self.report.update({
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(finished)),
            "duration_seconds": round(finished - self.started, 1),
            "status": self.status,
            "parameters": self.params.as_dict(),
            "selected_targets": self.selected,
            "workload_families": self.families,
            "environment": self.environment,
            "load_average": {"start": self.load_start, "end": tools.loadavg()},
            "targets": self.target_states,
            "workloads": catalogue(self.params),
            "results": self.results,
            "subjects": subjects,
            "baselines": list(reporting.BASELINES),
            "ratios": reporting.compute_ratios(self.results, subjects),
            "rss": self.rss,
            "checks": reporting.evaluate_goals(self.results, self.rss, self.target_states),
            "device_context": reporting.device_context(self.results),
            "metadata_floor": reporting.metadata_floor(self.results),
        })
        os.makedirs(self.out_dir, exist_ok=True)
        reporting.write_json(os.path.join(self.out_dir, "report.json"), self.report)
        with open(os.path.join(self.out_dir, "report.md"), "w") as handle:
            handle.write(reporting.render_markdown(self.report))


def rerender(out_dir):
    import json
    with open(os.path.join(out_dir, "report.json")) as handle:
        report = json.load(handle)
    # The goals are checked again with this Bench's rules, so an older run reads as it would now.
    report["checks"] = reporting.evaluate_goals(report["results"], report.get("rss", {}), report.get("targets", {}))
    with open(os.path.join(out_dir, "report.md"), "w") as handle:
        handle.write(reporting.render_markdown(report))
    print(os.path.join(out_dir, "report.md"))
    return 0


def main(argv):
    args = parse_arguments(argv)
    if args.report_only:
        return rerender(args.report_only)
    if os.geteuid() != 0:
        print("Bench/run: needs root (mounting, dropping the page cache, installing packages)", file=sys.stderr)
        return 2
    install_signal_handlers()
    session = Session(args, argv)
    exit_code = 0
    try:
        session.run()
        session.status = "complete"
    except KeyboardInterrupt as interruption:
        session.status = "interrupted"
        log(f"interrupted ({str(interruption) or 'Ctrl-C'}): cleaning up")
        exit_code = 130
    except BenchError as error:
        session.status = "failed"
        log(f"FAILED: {error}")
        exit_code = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not stop the cleanup
        Cleanup.run_all()
        try:
            session.write_reports()
            log(f"report: {os.path.join(session.out_dir, 'report.md')}")
        except Exception as error:  # the run's own error matters more than the report's
            log(f"could not write the report: {error}")
            exit_code = exit_code or 1
    return exit_code
