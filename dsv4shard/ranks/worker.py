"""One rank of a RankPool: join the group, then answer jobs until told to exit.

A job names a task and a case; every rank builds the same weights from the
case's seed, so only the configuration crosses the wire.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback

import mlx.core as mx
import numpy as np

from dsv4shard import impl, kernel_cache
from dsv4shard.backend import on_model_device
from dsv4shard.ranks import wire


def protocol_stream():
    """Keep the real stdout for protocol lines and send everything else a
    library prints to stderr, so that one job gives exactly one line."""
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(fd, "w", buffering=1)


def log_job(job: dict, group) -> None:
    """One line on this rank's stderr per job: what a rank was doing when it
    died is in the stderr the pool reports."""
    what = job.get("case") or job.get("seed", "")
    print(f"rank {group.rank()} of {group.size()}: job {job.get('task')} {str(what)[:300]}",
          file=sys.stderr, flush=True)


def run_moe(job: dict, group) -> dict:
    """Build the case's block, shard it with the function under test (and
    fuse it, if asked), run it (the block all_sums inside), and return the
    output, the chosen experts and the parameter bytes this rank holds.  The
    sharder's NotImplementedError comes back as ``declined``, a result its
    contract rules out as ``contract``."""
    from mlx.utils import tree_flatten

    from dsv4shard.engine.outcome import one_line
    from dsv4shard.fuse import ContractError, apply_installer
    from dsv4shard.shard import apply_sharder
    from dsv4shard.testing import data
    from dsv4shard.testing.repro import parse_case
    from dsv4shard.weights import DTYPES, build_block, to_numpy

    log_job(job, group)
    case = parse_case(job["case"])
    block = build_block(case.config, data.make_weights(case), case.quant, case.dtype)
    block.reduce_in_activation_dtype = job.get("reduce") == "activation"
    try:
        block = apply_sharder(impl.load(job["shard"]), block, group, job.get("split"))
        if job.get("fuse"):
            block.switch_mlp = apply_installer(impl.load(job["fuse"]), block.switch_mlp)
    except NotImplementedError as error:
        return {"declined": one_line(error) or "NotImplementedError"}
    except ContractError as error:
        return {"contract": str(error)}
    x = mx.array(data.make_tokens(case), dtype=mx.float32).astype(DTYPES[case.dtype])
    ids = data.make_input_ids(case)
    ids = None if ids is None else mx.array(ids, dtype=mx.int32)
    gate = block.get("gate")
    indices = gate(x, ids)[0] if callable(gate) else None
    y = block(x, ids)
    mx.eval(y)
    answer = {"y": wire.encode_array(to_numpy(y)),
              "nbytes": sum(v.nbytes for _, v in tree_flatten(block.parameters()))}
    if indices is not None:
        mx.eval(indices)
        answer["indices"] = wire.encode_array(np.sort(np.array(indices), axis=-1))
    return answer


def run_die(job: dict, group) -> dict:
    """For the pool's own tests: this rank exits, or hangs, on request."""
    if group.rank() == job.get("rank", 1):
        if job.get("how") == "hang":
            time.sleep(3600)
        os._exit(3)
    y = mx.distributed.all_sum(mx.ones((4,)), group=group)  # waits on the dead rank
    mx.eval(y)
    return {"y": wire.encode_array(np.array(y))}


def run_model(job: dict, group) -> dict:
    """A tiny deepseek_v41 model, its MoE blocks sharded over the group (and
    fused after sharding if asked): its logits for the job's tokens."""
    from dsv4shard.tiny_model import tiny_v41

    log_job(job, group)
    model = tiny_v41(job["seed"], job["layers"])
    fuse = impl.load(job["fuse"]) if job.get("fuse") else None
    impl.load(job["shard"])(model, group, fuse=fuse)
    logits = model(mx.array([job["tokens"]], dtype=mx.int32))
    mx.eval(logits)
    return {"logits": wire.encode_array(np.array(logits))}


def run_imports(job: dict, group) -> dict:
    """Whether every ``module:function`` of the job loads in this rank's
    process (its sys.path is not the test process's): the problems, if any."""
    problems = []
    for spec in job.get("specs", []):
        try:
            impl.load(spec)
        except ValueError as error:
            problems.append(str(error))
    return {"problems": problems}


def run_memory(job: dict, group) -> dict:
    """This rank's peak resident memory so far, in bytes."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss": peak if sys.platform == "darwin" else peak * 1024}


def run_ping(job: dict, group) -> dict:
    from dsv4shard import backend

    return {"device": backend.name()}


def run_unsupported(job: dict, group) -> dict:
    """Why this rank's backend cannot run experts in a format, or None."""
    from dsv4shard import backend
    from dsv4shard.testing.repro import parse_case

    return {"reason": backend.unsupported(parse_case(job["quant"]), job.get("dtype", "float32"))}


TASKS = {"moe": run_moe, "model": run_model, "die": run_die, "ping": run_ping,
         "unsupported": run_unsupported, "imports": run_imports, "memory": run_memory}


def run_variant_moe(job: dict, group) -> dict:
    """A variant's own Model.shard() on this rank: its MoE block's output
    (see dsv4shard.variants.sharded)."""
    from dsv4shard.variants.sharded import rank_job

    return rank_job(job, group)


TASKS["variant_moe"] = run_variant_moe


def run_variant_model(job: dict, group) -> dict:
    """A variant's own Model.shard() on this rank: the whole Model's logits
    (see dsv4shard.variants.sharded_model)."""
    from dsv4shard.variants.sharded_model import rank_job

    return rank_job(job, group)


TASKS["variant_model"] = run_variant_model


def run_versions(job: dict, group) -> dict:
    """What this rank runs (dsv4shard.ranks.preflight)."""
    from dsv4shard.ranks.preflight import versions

    return versions(job.get("files", ()))


TASKS["versions"] = run_versions


def forget_launch_files() -> None:
    """Remove the files the launch script wrote for the backend (a hostfile):
    ``init`` has read them."""
    for path in filter(None, os.environ.get("DSV4SHARD_TEMP_FILES", "").split(":")):
        try:
            os.unlink(path)
        except OSError:
            pass


def exit_with_parent(poll_s: float = 0.5) -> None:
    """Exit once the process that started this rank is gone.  A test
    process killed by a time limit closes this rank's stdin, but a rank
    that is joining its group, or waiting in a collective for a peer that
    died with it, never reads again; left running, it holds a GPU context
    and gigabytes of memory that the next run finds taken."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent and parent != 1:
            time.sleep(poll_s)
        os._exit(4)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def main() -> None:
    exit_with_parent()
    out = protocol_stream()
    backend = os.environ.get("DSV4SHARD_BACKEND", "ring")
    group = mx.distributed.init(backend=backend, strict=True)
    forget_launch_files()
    out.write(wire.dumps({"rank": group.rank(), "size": group.size(), "backend": backend}))
    for line in sys.stdin:
        job = wire.loads(line)
        if job is None:
            continue
        if job.get("task") == "exit":
            break
        try:
            with on_model_device(job.get("device", "default")):
                answer = TASKS[job["task"]](job, group)
        except Exception:
            answer = {"error": traceback.format_exc()}
        answer.update(rank=group.rank(), size=group.size())
        kernel_cache.sync()  # the kernels this job compiled, for the other processes
        out.write(wire.dumps(answer))


if __name__ == "__main__":
    main()
