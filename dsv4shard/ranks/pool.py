"""A pool of N rank processes that stay alive across many examples.

Every rank reads the same job from its stdin and answers on its stdout; the
test process sends a job to all ranks and waits for all answers within a
bounded time.  A rank that dies, hangs or errs fails the job with that
rank's stderr, and the whole pool is torn down: no process is left behind.
"""

from __future__ import annotations

import os
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from dsv4shard.ranks import wire
from dsv4shard.ranks.hostfile import Hostfile, rank_environments


class RankFailure(RuntimeError):
    """A rank died, hung, or raised; the message carries its stderr."""


def launch_script(env: dict[str, str], python: str, cwd: str, tmpdir: str | None = None) -> str:
    """The bash line that starts one rank: cd, export, write the files the
    backend reads (``@NAME`` entries) into ``tmpdir`` (the pool's own folder,
    on this host) or the host's temp folder, exec the worker.  The worker
    removes those files once it has joined the group (they are read at
    ``init``), and the pool removes its folder when it closes, so that a rank
    that dies before joining leaves nothing behind on this host either."""
    parts = [f"cd {shlex.quote(cwd)} 2>/dev/null || true"]
    where = f" -p {shlex.quote(tmpdir)}" if tmpdir else ""
    files = []
    for key, value in env.items():
        if key.startswith("@"):
            name = key[1:]
            parts.append(f"{name}=$(mktemp{where} dsv4shard-rank.XXXXXX) && printf %s "
                         f"{shlex.quote(value)} > ${name} && export {name}")
            files.append(f"${name}")
        else:
            parts.append(f"export {key}={shlex.quote(value)}")
    if files:
        parts.append(f"export DSV4SHARD_TEMP_FILES=\"{':'.join(files)}\"")
    parts.append(f"exec {shlex.quote(python)} -u -m dsv4shard.ranks.worker")
    return "; ".join(parts)


class RankPool:
    def __init__(self, hostfile: Hostfile, timeout: float = 120.0,
                 start_timeout: float = 60.0, python: str | None = None,
                 extra_env: dict[str, str] | None = None):
        self.hostfile = hostfile
        self.size = len(hostfile.hosts)
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.python = python or os.environ.get("DSV4SHARD_PYTHON") or sys.executable
        self.extra_env = extra_env or {}  # exported last: overrides the backend's
        self.procs: list[subprocess.Popen] = []
        self.stderr_files = []
        self.jobs = 0
        self.tmpdir: str | None = None  # this host's files of the ranks, removed at close

    # --- life cycle -------------------------------------------------------

    def start(self) -> RankPool:
        envs = rank_environments(self.hostfile)
        self.tmpdir = tempfile.mkdtemp(prefix="dsv4shard-ranks-")
        for host, env in zip(self.hostfile.hosts, envs):
            env = {**env, "DSV4SHARD_BACKEND": self.hostfile.backend, "PYTHONUNBUFFERED": "1",
                   **self.extra_env}
            script = launch_script(env, self.python, os.getcwd(),
                                   self.tmpdir if host.is_local else None)
            cmd = (["bash", "-c", script] if host.is_local
                   else ["ssh", "-o", "BatchMode=yes", host.ssh, "bash -c " + shlex.quote(script)])
            err = tempfile.TemporaryFile(mode="w+")
            self.stderr_files.append(err)
            self.procs.append(subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                start_new_session=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                    p for p in [os.getcwd(), os.environ.get("PYTHONPATH", "")] if p)}))
        hello = self._collect(self.start_timeout, "start-up")
        for rank, message in enumerate(hello):
            if message.get("size") != self.size or message.get("rank") != rank:
                self.close()
                raise RankFailure(
                    f"rank process {rank} joined a group of size {message.get('size')} as rank "
                    f"{message.get('rank')}, expected rank {rank} of {self.size} "
                    f"({self.hostfile.backend}); a size-1 group would pass vacuously")
        self.preflight()
        return self

    def preflight(self, files=()) -> None:
        """Every rank reports its versions, commit, source digest and the
        sha256 of ``files``; a rank that differs from this process stops
        the pool with one line naming its host."""
        from dsv4shard.ranks.preflight import PreflightError, compare, versions

        here = versions(files)
        answers = self.run({"task": "versions", "files": list(files)}, timeout=60)
        try:
            compare(here, answers, self.hostfile.hosts)
        except PreflightError as error:
            self.close()
            raise RankFailure(f"preflight: {error}") from None

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.stdin.write(wire.dumps({"task": "exit"}))
                    proc.stdin.flush()
                except OSError:
                    pass
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self._kill()
        self._release()

    def _kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()

    def _release(self) -> None:
        """Close every pipe and stderr file the pool opened."""
        for proc in self.procs:
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
        for f in self.stderr_files:
            f.close()
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    @property
    def alive(self) -> bool:
        return bool(self.procs) and all(p.poll() is None for p in self.procs)

    # --- jobs ---------------------------------------------------------------

    def run(self, job: dict, timeout: float | None = None) -> list[dict]:
        """Send ``job`` to every rank; return the answers by rank.  Raises
        RankFailure (and tears the pool down) on death, hang or error."""
        if not self.alive:
            dead = [r for r, p in enumerate(self.procs) if p.poll() is not None]
            tails = self._stderr_tails() if self.stderr_files and not self.stderr_files[0].closed \
                else ""
            self._kill()
            self._release()
            raise RankFailure(f"the rank pool is not running: rank(s) {dead} exited between "
                              f"jobs" + (f"\n{tails}" if tails else ""))
        line = wire.dumps(job)
        for rank, proc in enumerate(self.procs):
            try:
                proc.stdin.write(line)
                proc.stdin.flush()
            except OSError:
                self._fail(f"rank {rank} stopped reading jobs")
        try:
            answers = self._collect(timeout or self.timeout, f"job {job.get('task')}")
        except RankFailure:
            raise
        except BaseException:
            # Interrupted while the ranks work (a test's time limit, ^C): their
            # answers would reach the next job as its own, so the pool ends here
            # and the next user starts a fresh one.
            self._kill()
            self._release()
            raise
        self.jobs += 1
        errors = [(r, a["error"]) for r, a in enumerate(answers) if "error" in a]
        if errors:
            rank, error = errors[0]
            raise RankFailure(f"rank {rank} raised:\n{error}")
        return answers

    def _collect(self, timeout: float, what: str) -> list[dict]:
        answers: list[dict | None] = [None] * self.size
        selector = selectors.DefaultSelector()
        for rank, proc in enumerate(self.procs):
            os.set_blocking(proc.stdout.fileno(), True)
            selector.register(proc.stdout, selectors.EVENT_READ, rank)
        deadline = time.monotonic() + timeout
        try:
            while any(a is None for a in answers):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    waiting = [r for r, a in enumerate(answers) if a is None]
                    self._fail(f"{what}: ranks {waiting} gave no answer within {timeout:.0f} s "
                               "(hung)")
                for key, _ in selector.select(min(remaining, 1.0)):
                    rank = key.data
                    line = key.fileobj.readline()
                    if not line:
                        selector.unregister(key.fileobj)
                        code = self.procs[rank].wait()
                        self._fail(f"{what}: rank {rank} died (exit status {code})")
                    message = wire.loads(line)
                    if message is not None:
                        answers[rank] = message
                        selector.unregister(key.fileobj)
                for rank, proc in enumerate(self.procs):
                    if answers[rank] is None and proc.poll() is not None:
                        self._fail(f"{what}: rank {rank} died (exit status {proc.returncode})")
        finally:
            selector.close()
        return answers

    def _stderr_tails(self, chars: int = 2000) -> str:
        parts = []
        for rank, f in enumerate(self.stderr_files):
            f.seek(0)
            text = f.read()[-chars:].strip()
            parts.append(f"--- rank {rank} stderr ---\n{text or '(empty)'}")
        return "\n".join(parts)

    def _fail(self, reason: str):
        self._kill()
        message = f"{reason}\n{self._stderr_tails()}"
        self._release()
        raise RankFailure(message)
