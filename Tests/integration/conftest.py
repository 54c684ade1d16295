"""Fixtures for the Weft integration suite (see README.md).

- `resources`: the test's own temp dir and every process/mount it starts, always released.
- `mode`: `embedded` and `remote` (or only `localdir` with WEFT_TEST_TARGET=localdir).
- `weft`: a freshly formatted and mounted volume in that mode (`WeftFS`).
- `weft_factory`: the same with format/mount options, or more than one volume.
- `weft_cli`: the binaries, for tests of the command line itself.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import weft_harness as harness  # noqa: E402

DEFAULT_TEST_TIMEOUT_S = float(os.environ.get("WEFT_TEST_TIMEOUT", "600"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; skipped unless WEFT_SLOW=1")
    config.addinivalue_line("markers", "weft_timeout(seconds): per-test watchdog bound")


def pytest_report_header(config):
    if harness.is_localdir_target():
        return ["weft: WEFT_TEST_TARGET=localdir (self-check against the local file system, no Weft)"]
    return [f"weft: binaries in {harness.bin_dir()}; modes {', '.join(harness.selected_modes())}; "
            f"temp root {harness.temp_root()}"]


def pytest_collection_modifyitems(config, items):
    if os.environ.get("WEFT_SLOW") == "1":
        return
    skip_slow = pytest.mark.skip(reason="slow; set WEFT_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


def pytest_sessionstart(session):
    if harness.is_localdir_target() or session.config.option.collectonly:
        return
    if os.geteuid() != 0:
        pytest.exit("the Weft integration suite must run as root (mounts, chown, setuid children)",
                    returncode=4)
    missing = harness.missing_binaries()
    if missing:
        pytest.exit(f"Weft binaries not found: {', '.join(missing)}. Build them "
                    "(swift build -c release), point WEFT_BIN at them, or run the self-check "
                    "with WEFT_TEST_TARGET=localdir.", returncode=4)


def pytest_sessionfinish(session, exitstatus):
    harness.Resources.cleanup_all_live()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"_weft_report_{report.when}", report)


@pytest.fixture(autouse=True)
def _fixed_umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def resources(request):
    """The test's resources; released after the test whatever happened. A watchdog kills
    agents and daemons when the test overruns, so a hung FUSE call fails instead of hanging."""
    res = harness.Resources(request.node.name)
    marker = request.node.get_closest_marker("weft_timeout")
    timeout_s = float(marker.args[0]) if marker else DEFAULT_TEST_TIMEOUT_S
    timer = threading.Timer(timeout_s, res.emergency_stop,
                            args=(f"{request.node.nodeid} ran longer than {timeout_s:.0f}s",))
    timer.daemon = True
    timer.start()
    try:
        yield res
    finally:
        timer.cancel()
        call_report = getattr(request.node, "_weft_report_call", None)
        failed = call_report is not None and call_report.failed
        if failed or res.watchdog_fired:
            sys.stderr.write(f"\n[weft-it] logs of {request.node.nodeid} (kept in {res.base}):\n"
                             f"{res.log_tails()}\n")
        problems = res.cleanup(keep_dir=failed or res.watchdog_fired)
        for w in res.warnings:
            warnings.warn(f"{request.node.nodeid}: {w}", stacklevel=1)
        if res.watchdog_fired:
            pytest.fail(f"watchdog: test ran longer than {timeout_s:.0f}s", pytrace=False)
        if problems:
            pytest.fail("could not release resources: " + "; ".join(problems), pytrace=False)


@pytest.fixture(params=harness.selected_modes())
def mode(request):
    return request.param


@pytest.fixture
def weft_factory(mode, resources):
    """make(format_args=(), mount_args=(), name='fs', hub_args=()) -> WeftFS, set up and mounted.
    hub_args go to weftd (remote) or to the mount that embeds the hub (embedded)."""
    def make(format_args=(), mount_args=(), name: str = "fs", hub_args=()) -> harness.WeftFS:
        return harness.WeftFS(resources, mode, format_args, mount_args, name=name, hub_args=hub_args).setup()
    return make


@pytest.fixture
def weft(weft_factory):
    """A freshly formatted, mounted volume (default options) in the current mode."""
    return weft_factory()


@pytest.fixture
def weft_cli(resources):
    """The weft/weftd binaries (tests of the CLI itself); skipped in localdir mode."""
    if harness.is_localdir_target():
        pytest.skip("localdir self-check: CLI tests need the Weft binaries")
    return harness.WeftCLI(resources)
