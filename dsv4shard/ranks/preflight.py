"""Before any property runs across hosts: every rank says what it runs, and a
host that differs from this one is refused in one line.

A one-sided upgrade on a cluster otherwise fails deep inside loading with
shape errors that read like model corruption; here it reads as
``host mac2.local (rank 1) differs: mlx 0.32.3 there, 0.32.4 here``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

# What must agree on every rank (file hashes are added per run).
FIELDS = ("python", "mlx", "mlx_lm", "dsv4shard", "commit", "source")


class PreflightError(RuntimeError):
    """A rank's host differs from this one; the message names it."""


def source_digest() -> str:
    """sha256 over the project's own Python sources (dsv4shard/, reference/),
    as this process imports them: an uncommitted change differs too."""
    import dsv4shard

    root = Path(dsv4shard.__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in ("dsv4shard", "reference"):
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, cwd=os.getcwd())
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "not a git checkout"


def file_sha256(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError as error:
        return f"unreadable ({error.strerror})"


def versions(files=()) -> dict:
    """What this process runs: versions, the checkout's commit and source
    digest, and the sha256 of each file named (a variant's model file)."""
    from dsv4shard.versions import running

    return {**running(), "commit": commit(), "source": source_digest(),
            "files": {f: file_sha256(f) for f in files}}


def compare(here: dict, answers: list[dict], hosts) -> None:
    """Raise PreflightError naming the first rank whose report differs."""
    for rank, (there, host) in enumerate(zip(answers, hosts)):
        differ = [f"{k} {there.get(k)} there, {here[k]} here" for k in FIELDS
                  if there.get(k) != here[k]]
        differ += [f"{name} sha256 {there.get('files', {}).get(name)} there, {digest} here"
                   for name, digest in here["files"].items()
                   if there.get("files", {}).get(name) != digest]
        if differ:
            raise PreflightError(f"host {host.ssh or 'localhost'} (rank {rank}) differs: "
                                 f"{'; '.join(differ)}")
