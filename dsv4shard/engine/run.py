"""The runner: one property, one implementation, hypothesis-drawn cases,
one verdict.

``run`` is what every view of the suite calls: ``dsv4shard check`` (the
project's properties and every variant property), ``pytest --variant``,
and the kill matrix (``expect_failure``: stop at the first failure, no
shrinking).  The verdict's words are those of
:mod:`dsv4shard.engine.outcome`.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import asdict, dataclass, field

from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis.errors import HypothesisException, Unsatisfiable

from dsv4shard.attribution import flight_recording
from dsv4shard.engine import outcome as o
from dsv4shard.engine.records import Property
from dsv4shard.testing import example_log, report


@dataclass
class Verdict:
    prop: str
    subject: str  # the implementation (or variant) it ran against
    required: bool
    status: str  # one of outcome.STATUSES
    detail: str  # the diagnosis, the reason, or what passed
    examples: int = 0  # examples run (up to the first failure when it failed)
    seconds: float = 0.0
    reproduce: str = ""  # one shell line rerunning the failing case
    declined: list[str] = field(default_factory=list)  # NotImplementedError messages
    case: str = ""  # the (shrunk) failing case's repr

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def fatal(self) -> bool:
        return self.status in (o.FAIL, o.ERROR)


def reproducer(prop: Property, case, subject_option: str | None) -> str:
    parts = ["python", "-m", "dsv4shard.testing.repro", prop.qualified, repr(case)]
    if subject_option:
        parts.append(subject_option)
    return shlex.join(parts)


def run(prop: Property, impl: dict | None = None, *, subject: str = "", examples: int = 25,
        shrink: bool = True, cases=None, subject_option: str | None = None) -> Verdict:
    """Draw ``prop``'s cases (derandomized, no database) and call
    ``prop.fn(case, **impl)`` on each (``cases``: another strategy, e.g. a
    known-bad implementation's narrowing to where its bug lives).

    - a failure (Departure, any AssertionError, any exception the
      implementation raises) ends the run: FAIL when the property is
      required, else DEPARTS; shrunk unless ``shrink`` is off;
    - ``NotApplicable`` (or pytest's skip) ends it: SKIP;
    - ``NotImplementedError`` rejects that case (the implementation declines
      it); DECLINED when every case was declined;
    - passing examples whose comparison was weak (their detail an
      ``outcome.Weak``), WEAK_SHARE of them or more, make the verdict WEAK,
      not PASS (fewer are named in the PASS detail);
    - ``Minor`` departures are kept and reported as DEPARTS with their size
      when nothing worse happens;
    - ``BackendDefect``: BACKEND (MLX's kernel, not the implementation);
      every failure passes through the attribution hook
      (``dsv4shard.testing.report.judged``), which makes it one where the
      case passes on ``mx.cpu`` and an MLX operation departs on the device.
    """
    impl = impl or {}
    budget = min(examples, prop.examples) if prop.examples else examples
    count = 0
    seen: dict = {"detail": "", "minor": None, "declined": [], "error": None, "case": None,
                  "weak": [], "examples": 0}

    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if shrink else [])

    @settings(max_examples=budget, deadline=None, database=None, derandomize=True,
              phases=phases, suppress_health_check=list(HealthCheck),
              report_multiple_bugs=False, print_blob=False)
    @given(case=cases if cases is not None else prop.cases())
    def body(case):
        nonlocal count
        count += 1
        # The example's own MLX calls, for the attribution of its failure.
        with flight_recording():
            try:
                with example_log.example(prop.name, case):
                    detail = prop.fn(case, **impl)
            except HypothesisException:
                raise
            except o.Minor as minor:
                seen["minor"] = seen["minor"] or o.one_line(minor)
                return
            except NotImplementedError as declined:
                message = o.one_line(declined) or "NotImplementedError"
                if message not in seen["declined"]:
                    seen["declined"].append(message)
                reject()
            except BaseException as error:
                if o.is_skip(error):
                    raise _Stop(error) from None
                # The attribution hook (a no-op on mx.cpu, and for failures that
                # went through it already): a BackendDefect where MLX is at fault.
                judged = report.judged(prop.fn, case, error, **impl)
                seen["error"], seen["case"] = judged, case
                if judged is error:
                    raise
                raise judged from error
            seen["examples"] += 1
            if isinstance(detail, o.Weak):
                seen["weak"].append(detail)
            elif isinstance(detail, str) and detail:
                seen["detail"] = detail

    start = time.perf_counter()
    status, detail, case_text, repro = o.PASS, "", "", ""
    try:
        body()
    except _Stop as stop:
        status, detail = o.SKIP, o.first_line(stop.error)
    except Unsatisfiable:
        if seen["declined"]:
            status, detail = o.DECLINED, "; ".join(seen["declined"])
        else:
            status, detail = o.SKIP, "no case could be drawn"
    except HypothesisException as error:  # the harness's own trouble, never a pass
        status, detail = o.ERROR, f"{type(error).__name__}: {o.first_line(error)}"
        if seen["error"] is not None:  # a failure that did not recur on replay
            notes = [n for n in getattr(seen["error"], "__notes__", ()) if n.startswith(
                "attribution:")]
            detail += "; ".join([f"; the first time: {_describe(seen['error'])}", *notes,
                                 _reruns(prop, seen["case"], impl)])
            case_text = repr(seen["case"])
            repro = reproducer(prop, seen["case"], subject_option)
    except BaseException as error:  # noqa: BLE001 - the property failed
        failure = seen["error"] if seen["error"] is not None else error
        status = _failure_status(prop, failure)
        detail = _describe(failure)
        case_text = repr(seen["case"]) if seen["case"] is not None else ""
        if seen["case"] is not None:
            repro = reproducer(prop, seen["case"], subject_option)
    if status == o.PASS and seen["minor"]:
        status, detail = o.DEPARTS, seen["minor"]
    elif status == o.PASS:
        weak = seen["weak"]
        named = (f"weak in {len(weak)} of {seen['examples']} passing examples, e.g. "
                 f"{weak[0].removeprefix('weak: ')}" if weak else "")
        if weak and len(weak) >= WEAK_SHARE * seen["examples"]:
            status, detail = o.WEAK, named
        else:
            detail = "; ".join(filter(None, (seen["detail"] or f"{count} examples", named)))
    return Verdict(prop.name, subject, prop.required, status, o.one_line(detail), count,
                   round(time.perf_counter() - start, 2), repro, list(seen["declined"]),
                   case_text)


# The share of passing examples whose comparison missed its power target
# that makes a verdict WEAK: a setting the strategy draws often (a dtype on
# this backend, say) is weak; a rare draw at the edge of its target is only
# named in the detail.
WEAK_SHARE = 0.2


class _Stop(Exception):
    """Carries a skip out of hypothesis (which would otherwise re-run it)."""

    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


FLAKY_RERUNS = 3


def _reruns(prop: Property, case, impl: dict) -> str:
    """How often a failure Hypothesis could not replay recurs on the same
    case: what tells a race (a kernel's, or state kept between calls) from
    a wrong answer that needs the first call of a process."""
    failed = 0
    for _ in range(FLAKY_RERUNS):
        try:
            prop.fn(case, **impl)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as error:  # noqa: BLE001 - counted, not judged (a hang too)
            if o.is_skip(error) or isinstance(error, (NotImplementedError, o.Minor)):
                continue
            failed += 1
    return f"it failed again in {failed} of {FLAKY_RERUNS} reruns of that case"


def _failure_status(prop: Property, error: BaseException) -> str:
    if isinstance(error, o.BackendDefect):
        return o.BACKEND
    return o.FAIL if prop.required else o.DEPARTS


def _describe(error: BaseException) -> str:
    """The diagnosis: a Departure's or an assertion's own words; for anything
    else the implementation raised, its type, message and where."""
    if isinstance(error, AssertionError):
        return o.first_line(error)
    return f"raised {type(error).__name__}: {o.first_line(error)}{where(error)}"


def where(error: BaseException) -> str:
    import traceback

    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {f.filename.rsplit('/', 1)[-1]}:{f.lineno})"
