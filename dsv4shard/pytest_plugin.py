"""dsv4shard's pytest plugin (registered as a ``pytest11`` entry point, so a
port's own CI gets it with ``pip install dsv4shard``).

Options choose the implementation under test and where real ranks run:
``--fuse-impl module:function``, ``--shard-impl module:function``,
``--ranks N``, ``--hostfile PATH``, ``--variant X``, ``--example-timeout S``.
A bad value of any of them is one usage error at start-up, before any test
runs.  The ``judge`` fixture runs a property over a strategy the way every
test of someone else's code should: each example under a time limit, a
NotImplementedError from the implementation recorded as *declined* (never a
failure, unless the configuration is DeepSeek-V4's own: the property says
so), and a dead or hung rank pool reported once, with its stderr.  The
session summary lists what was declined.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dsv4shard import impl

DEFAULT_FUSE_IMPL = "dsv4shard.fuse:install_fused"
DEFAULT_SHARD_IMPL = "dsv4shard.shard:shard"
DECLINED_KEY = "dsv4shard_declined"
# After this many examples declined and none run, a property stops: the
# implementation declines the whole region (the test is skipped, saying so).
DECLINE_CAP = 20


def load_impl(spec: str, option: str = "implementation"):
    try:
        return impl.load(spec)
    except ValueError as error:
        raise pytest.UsageError(f"{option}: {error}") from error


def pytest_addoption(parser):
    from dsv4shard.testing.guard import example_timeout

    group = parser.getgroup("dsv4shard")
    group.addoption("--fuse-impl", default=DEFAULT_FUSE_IMPL, metavar="MODULE:FUNCTION",
                    help="fused gate+up installer under test; contract: function(switch_glu) "
                         "returns the module to use, or None when it fused in place "
                         "(default: %(default)s)")
    group.addoption("--shard-impl", default=DEFAULT_SHARD_IMPL, metavar="MODULE:FUNCTION",
                    help="sharding function under test, module:function; contract: "
                         "function(moe_block, group[, weights=...]) returns the block to use")
    group.addoption("--ranks", default="2", metavar="N",
                    help="real ranks started on localhost for distributed tests (default 2; "
                         "capped by this machine's memory)")
    group.addoption("--hostfile", default=os.environ.get("DSV4SHARD_HOSTFILE"),
                    help="mlx.launch hostfile for the hardware tier "
                         "(or DSV4SHARD_HOSTFILE); its backend: jaccl, ring or nccl")
    group.addoption("--variant", action="append", default=[], metavar="MODULE_OR_FILE",
                    help="run the conformance checks of this DeepSeek-V4 variant as test items "
                         "(repeatable): a module name (mlx_lm.models.deepseek_v41) or a model "
                         "file that imports its siblings from mlx_lm.models; select only them "
                         "with -m variant")
    group.addoption("--example-timeout", default=str(example_timeout()), metavar="SECONDS",
                    help="wall-clock limit of one example of a property run in this process, "
                         "and of one job on the real ranks (default %(default)s: 60 on the "
                         "CPU, 180 on a GPU, whose first example of a format compiles kernels)")
    group.addoption("--no-kernel-warmup", action="store_true",
                    help="on MLX's CUDA build, do not compile the suite's quantized matmul "
                         "kernels in parallel before an xdist run's workers start (they are "
                         "then compiled where a test first meets them)")


# --- one usage error at start-up -------------------------------------------------------


def ranks_of(config) -> int:
    return int(config.getoption("--ranks"))


def test_workers(config) -> int:
    """How many xdist workers will each start their own ranks (1 without xdist)."""
    n = getattr(config.option, "numprocesses", None)
    try:
        return max(1, int(n)) if n else 1
    except (TypeError, ValueError):
        return os.cpu_count() or 1


def problems(config) -> list[str]:
    """Every bad option value, each in one line (an empty list: all good)."""
    from dsv4shard.rank_memory import RankMemoryError, check

    found = []
    for option, arity in (("--fuse-impl", 1), ("--shard-impl", 2)):
        spec = config.getoption(option)
        try:
            fn = impl.load(spec)
        except ValueError as error:
            found.append(f"{option}: {error}")
            continue
        bad = arity_problem(fn, arity)
        if bad:
            found.append(f"{option} {spec}: {bad}")
    raw = config.getoption("--ranks")
    try:
        ranks = int(raw)
    except (TypeError, ValueError):
        found.append(f"--ranks: expected a whole number of ranks, got {raw!r}")
    else:
        if ranks < 2:
            found.append(f"--ranks must be at least 2 (a group of 1 passes vacuously), got "
                         f"{ranks}")
        else:
            try:
                check(ranks, test_workers(config))
            except RankMemoryError as error:
                found.append(str(error))
    raw = config.getoption("--example-timeout")
    try:
        if float(raw) <= 0:
            raise ValueError
    except (TypeError, ValueError):
        found.append(f"--example-timeout: expected a positive number of seconds, got {raw!r}")
    path = config.getoption("--hostfile")
    if path:
        from dsv4shard.ranks import hostfile as hf

        try:
            hf.load(path)
        except hf.HostfileError as error:
            found.append(f"--hostfile: {error}")
    for spec in config.getoption("--variant") or []:
        bad = variant_problem(spec)
        if bad:
            found.append(f"--variant {spec}: {bad}")
    return found


def arity_problem(fn, arity: int) -> str | None:
    """Why ``fn`` cannot be called with ``arity`` positional arguments, or None."""
    import inspect

    try:
        inspect.signature(fn).bind(*range(arity))
    except TypeError as error:
        contract = ("function(switch_glu)" if arity == 1 else "function(moe_block, group)")
        return f"{error}; the contract is {contract}"
    except ValueError:  # no signature to read (a builtin): let the tests say
        return None
    return None


def variant_problem(spec: str) -> str | None:
    """Why ``spec`` names no file or module (without importing it: each
    variant is imported in a process of its own), or None."""
    import importlib.util

    from dsv4shard.variants.loading import is_path

    if is_path(spec):
        return None if os.path.isfile(spec) else "no such file"
    try:
        found = importlib.util.find_spec(spec)
    except (ImportError, ValueError) as error:
        return f"no such module ({error})"
    return None if found else "no such module (neither a file nor an importable module)"


def rank_import_problems(specs: list[str]) -> list[str]:
    """Whether each ``module:function`` loads in a process started as the
    rank processes are (``python -m dsv4shard.ranks.worker`` in this folder,
    with this folder on PYTHONPATH), where this process's sys.path, conftest
    insertions included, does not reach."""
    if not specs:
        return []
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [os.getcwd(), env.get("PYTHONPATH", "")]
                                        if p)
    code = ("import sys\nfrom dsv4shard import impl\nfor s in sys.argv[1:]:\n"
            "    try:\n        impl.load(s)\n    except ValueError as e:\n"
            "        print(e)\n")
    python = os.environ.get("DSV4SHARD_PYTHON") or sys.executable
    try:
        done = subprocess.run([python, "-c", code, *specs], capture_output=True, text=True,
                              timeout=120, env=env, cwd=os.getcwd())
    except (OSError, subprocess.SubprocessError) as error:
        return [f"cannot start a Python like the rank processes' to check the imports: {error}"]
    found = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode and not found:
        found.append((done.stderr.strip().splitlines() or ["it exited with an error"])[-1])
    return found


def pytest_configure(config):
    config.addinivalue_line("markers", "variant: a conformance check of a --variant")
    config.addinivalue_line("markers", "variant_required: a required conformance check")
    if hasattr(config, "workerinput"):  # an xdist worker: the controller checked already
        return
    found = problems(config)
    if not found:
        specs = [config.getoption(o) for o, default in
                 (("--fuse-impl", DEFAULT_FUSE_IMPL), ("--shard-impl", DEFAULT_SHARD_IMPL))
                 if config.getoption(o) != default]
        found = [f"importable here but not in a rank process (started as `python -m "
                 f"dsv4shard.ranks.worker` in {os.getcwd()}, with that folder on PYTHONPATH): "
                 f"{problem}; install the module, or run pytest from the folder it is "
                 f"imported from" for problem in rank_import_problems(specs)]
    if found:
        raise pytest.UsageError("dsv4shard: " + "\n  ".join(found))


def session_args() -> list[str]:
    """Arguments that give a new pytest session (pytester, a child pytest)
    this plugin: none where the installed project's entry point loads it;
    ``-p dsv4shard.pytest_plugin`` where no entry point declares it (a
    source tree on PYTHONPATH, whose root conftest registers it for its own
    sessions only)."""
    from importlib.metadata import entry_points

    declared = any(e.name == "dsv4shard" for e in entry_points(group="pytest11"))
    autoload = not os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD")
    return [] if declared and autoload else ["-p", "dsv4shard.pytest_plugin"]


@pytest.hookimpl(tryfirst=True)  # before xdist starts its workers (its hook is trylast)
def pytest_sessionstart(session):
    """On a backend that compiles kernels, an xdist run's controller compiles
    the quantized matmul kernels the suite meets that MLX's cache lacks, many
    at once (``dsv4shard.kernel_warmup``): a fresh machine's first run would
    otherwise compile them one after another inside single tests."""
    config = session.config
    if (hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None)
            or config.getoption("--no-kernel-warmup") or config.option.collectonly):
        return
    from dsv4shard.backend import compiles_kernels

    if not compiles_kernels():
        return
    import mlx.core as mx

    from dsv4shard import kernel_cache, kernel_warmup

    cache = kernel_cache.shared_directory(mx.__version__)
    todo = kernel_warmup.missing(kernel_warmup.SUITE_KERNELS, cache)
    if not todo:
        return
    say = config.pluginmanager.get_plugin("terminalreporter")
    write = say.write_line if say else print
    write(f"dsv4shard: compiling {len(todo)} of MLX's CUDA matmul kernels that its cache "
          f"({cache}) lacks, {os.cpu_count()} at a time (once a machine; "
          f"--no-kernel-warmup to skip)")
    write(kernel_warmup.warm(todo, cache).line())


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def shard_impl(request):
    """The sharding function under test (``--shard-impl``)."""
    return load_impl(request.config.getoption("--shard-impl"), "--shard-impl")


@pytest.fixture(scope="session")
def fuse_impl(request):
    """The fused gate+up installer under test (``--fuse-impl``)."""
    return load_impl(request.config.getoption("--fuse-impl"), "--fuse-impl")


@pytest.fixture(scope="session")
def example_timeout(request) -> float:
    return float(request.config.getoption("--example-timeout"))


@pytest.fixture(scope="session")
def own_shard_impl(request) -> bool:
    """Whether ``--shard-impl`` is dsv4shard's own sharder."""
    return request.config.getoption("--shard-impl") == DEFAULT_SHARD_IMPL


@pytest.fixture
def judge(request, example_timeout):
    """``judge(prop, strategy, **impl)``: run ``prop(case, **impl)`` on cases
    drawn from ``strategy`` (the active hypothesis profile's examples, or
    ``share`` of them, or ``examples``) with a time limit on each
    (``timeout=None`` for none: real-rank jobs have the pool's own)."""

    def run(prop, strategy, *, examples=None, share=None, timeout=example_timeout, **impl):
        return judge_property(request.node, prop, strategy, examples=examples, share=share,
                              timeout=timeout, **impl)

    return run


class _EveryCaseDeclined(BaseException):
    """Stops a property whose implementation declines every case drawn."""


def judge_property(node, prop, strategy, *, examples=None, share=None, timeout=None, **impl):
    """See the ``judge`` fixture; ``node`` is the test item (the declined
    cases are recorded in its user_properties for the session summary)."""
    from hypothesis import HealthCheck, given, reject, settings
    from hypothesis.errors import Unsatisfiable

    from dsv4shard.engine.outcome import one_line
    from dsv4shard.testing.guard import Hung, RanksLost, time_limit

    current = settings()
    budget = examples or current.max_examples
    if share:
        budget = max(1, round(budget * share))
    checks = list(current.suppress_health_check) + [HealthCheck.filter_too_much]
    declined: dict[str, int] = {}
    ran = [0]

    pool = impl.get("pool")

    @settings(max_examples=budget, suppress_health_check=checks)
    @given(case=strategy)
    def body(case):
        try:
            with time_limit(timeout, f"{prop.__name__} on one example"):
                prop(case, **impl)
        except Exception as error:
            if pool is not None and not getattr(pool, "alive", True):
                # A replay would find the pool gone and call the run flaky.
                raise RanksLost(f"{prop.__name__}: the rank pool stopped: {error}\n  case: "
                                f"{case!r}") from None
            if not isinstance(error, NotImplementedError):
                raise
            message = one_line(error) or "NotImplementedError"
            declined[message] = declined.get(message, 0) + 1
            if not ran[0] and sum(declined.values()) >= DECLINE_CAP:
                raise _EveryCaseDeclined() from None
            reject()
        ran[0] += 1

    def summary() -> str:
        return "; ".join(f"{message} ({n} example{'s' if n > 1 else ''})"
                         for message, n in declined.items())

    try:
        body()
    except (Hung, RanksLost) as error:
        pytest.fail(str(error), pytrace=False)
    except _EveryCaseDeclined:
        pytest.skip(f"declined: {summary()}")
    except Unsatisfiable:
        if declined and not ran[0]:
            pytest.skip(f"declined: {summary()}")
        raise
    finally:
        if declined:
            node.user_properties.append((DECLINED_KEY, summary()))


@pytest.fixture(scope="session")
def rank_pool(request, example_timeout):
    """N real ranks on localhost (ring), alive for the whole session; each
    job bounded by ``--example-timeout``.  The implementations under test
    must load in the rank processes: checked as soon as they start."""
    from dsv4shard.ranks import hostfile as hf
    from dsv4shard.ranks.pool import RankPool

    size = ranks_of(request.config)  # within this machine's memory: checked at start-up
    with RankPool(hf.local(size, "ring"), timeout=max(example_timeout, 10.0)) as pool:
        specs = [request.config.getoption(o) for o in ("--fuse-impl", "--shard-impl")]
        trouble = {p for a in pool.run({"task": "imports", "specs": specs})
                   for p in a.get("problems", [])}
        if trouble:
            pytest.fail("the rank processes cannot load the implementation under test: "
                        + "; ".join(sorted(trouble)), pytrace=False)
        yield pool


@pytest.fixture(scope="session")
def hardware_pool(request):
    """Ranks across the hostfile's hosts; the tier skips without one."""
    from dsv4shard.ranks import hostfile as hf
    from dsv4shard.ranks.pool import RankPool

    path = request.config.getoption("--hostfile")
    if not path:
        pytest.skip("hardware tier: no hostfile (pass --hostfile or set DSV4SHARD_HOSTFILE)")
    with RankPool(hf.load(path)) as pool:
        yield pool


# --- the attribution's record of each test ------------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Each test's MLX calls are kept while it runs on a device other than
    ``mx.cpu`` (``attribution.flight_recording``), so that a failure is
    judged on the failing run's own arrays; on ``mx.cpu`` nothing is kept.
    With ``DSV4SHARD_EXAMPLE_LOG`` set, each example of a hypothesis test is
    timed, with its MLX operations (``dsv4shard.testing.example_log``)."""
    from dsv4shard.attribution import flight_recording
    from dsv4shard.testing import example_log

    hypothesis = (getattr(getattr(item, "obj", None), "hypothesis", None)
                  if example_log.path() else None)
    if hypothesis is not None:  # each example timed (DSV4SHARD_EXAMPLE_LOG)
        inner = hypothesis.inner_test
        hypothesis.inner_test = example_log.timed_test(item.nodeid, inner)
    try:
        with flight_recording():
            yield
    finally:
        if hypothesis is not None:
            hypothesis.inner_test = inner


def pytest_runtest_logfinish(nodeid, location):
    """After each test, this process and the others share the kernels each
    compiled (``dsv4shard.kernel_cache.sync``; nothing off MLX's CUDA build)."""
    from dsv4shard import kernel_cache

    kernel_cache.sync()


# --- the session summary ------------------------------------------------------------------


_DECLINED: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    if report.when != "call":
        return
    for key, value in getattr(report, "user_properties", ()):
        if key == DECLINED_KEY and (report.nodeid, value) not in _DECLINED:
            _DECLINED.append((report.nodeid, value))


def pytest_terminal_summary(terminalreporter):
    if not _DECLINED:
        return
    terminalreporter.write_sep("=", "declined by the implementation under test "
                                    "(NotImplementedError)")
    for nodeid, text in _DECLINED:
        terminalreporter.write_line(f"{nodeid}: {text}")


def pytest_report_header(config):
    import mlx.core as mx

    from dsv4shard.backend import name

    # Which backend's kernels every verdict below is about.
    lines = [f"dsv4shard: MLX {mx.__version__}, backend {name()} ({mx.default_device()})"]
    for option, default in (("--fuse-impl", DEFAULT_FUSE_IMPL),
                            ("--shard-impl", DEFAULT_SHARD_IMPL)):
        spec = config.getoption(option, default)
        if spec != default:
            lines.append(f"{option.lstrip('-')} under test: {spec}")
    return lines


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselect, so that they apply to these items
def pytest_collection_modifyitems(session, config, items):
    specs = config.getoption("--variant", default=None)
    if specs:
        from dsv4shard.variants.pytest_items import items_for

        items.extend(items_for(session, specs))
