"""A variant's whole tiny Model, attention included, sharded by its own
``Model.shard()`` over real ranks, against the same Model unsharded.

The test process builds the variant's tiny ``Model`` with seeded random
weights (every parameter, attention sinks included, dense float32), runs a
prefill and a few decode steps through the Model's own cache, and keeps the
logits of every step and the outputs of every decoder layer and of each of
its sublayers (attention, MoE block, norms, ...).  Every rank builds the same
Model from the same seed, calls ``model.shard(group)`` and runs the same
steps.  Each rank's logits must match the unsharded ones within a float32
bound (see :func:`bound`); when they do not, the recorded sublayer outputs
say where the sharded Model first departs, and a crash on a rank is reported
with the module whose call raised and the MLX operation.  Seeds whose
unsharded run takes a discrete decision (expert top-k, fp8 rounding) near a
flip are skipped (see :func:`watch_discrete`), and every rank must report a
group of ``ranks`` and hold less than the whole Model, so that the check
cannot pass vacuously.

SPEC section 7: ports shard attention by heads and must slice the per-head
attention sinks with them; two real ports do not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import re
import secrets
import sys
import traceback
import types
import zlib
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from dsv4shard.backend import model_device, model_device_note, on_model_device
from dsv4shard.engine.outcome import Departure, NotApplicable, one_line
from dsv4shard.ranks import wire
from dsv4shard.testing import tolerance
from dsv4shard.variants.adapter import Setting, StructureError, Variant, alias, instantiate
from dsv4shard.variants.sharded import local_pool, worker_spec
from dsv4shard.weights import to_numpy

PREFILL, DECODE = 4, 2  # tokens of the prefill, then single-token decode steps
# Candidate seeds, tried in order until one leaves no discrete decision near a
# flip (see watch_discrete); each candidate costs one small unsharded run.
SEEDS = tuple(range(7, 7 + 24))
TIMEOUT = 60.0  # seconds for one job on every rank (a normal job takes about 1 s)

# ModelArgs fields that a tensor-parallel shard() divides by the rank count.
HEAD_FIELDS = ("num_attention_heads", "num_key_value_heads", "o_groups", "index_n_heads",
               "n_heads", "n_kv_heads")

# The float32 bound (see bound()): units of u * sqrt(R) * scale.
SLACK_ULPS = 16
# A discrete decision this close to a flip (units of u * sqrt(R) of its input's
# scale) may rightly go the other way on a rank (see watch_discrete).
TIE_ULPS = 4
MARKER = "@dsv4shard-sharded-forward "  # prefixes a rank's structured crash report


# --- the tiny Model -------------------------------------------------------------------


def model_class(variant: Variant):
    """The variant's Model class: the adapter's, else the module's ``Model``."""
    try:
        cls = variant.layout.model_cls
    except StructureError:
        cls = None
    if cls is None:
        cls = getattr(variant.module, "Model", None)
    return cls if isinstance(cls, type) else None


def moe_class(variant: Variant):
    try:
        return variant.layout.moe_cls
    except StructureError:
        return None


def tiny_args(variant: Variant, ranks: int, overrides: dict | None = None):
    """The adapter's tiny ModelArgs with every head count a multiple of
    ``ranks`` (the smallest common multiple of the adapter's count and the
    ranks), then ``overrides`` (fields the variant lacks are left out)."""
    args = variant.args(Setting())
    names = {f.name for f in dataclasses.fields(args)}
    changes = {}
    for name in HEAD_FIELDS:
        value = getattr(args, name, None)
        if name in names and isinstance(value, int) and value > 0:
            changes[name] = math.lcm(value, ranks)
    changes.update({k: v for k, v in (overrides or {}).items() if k in names})
    return dataclasses.replace(args, **changes) if changes else args


def fill_weights(model, seed: int, experts: int) -> None:
    """Every parameter random and non-zero, from a generator seeded by
    ``seed`` and the parameter's name (so the order of the walk does not
    matter), dense float32, scaled so that activations stay O(1):

    - matrices and stacks of them: normal / sqrt(fan-in);
    - vectors named ``*bias*``: normal * 0.1 (a router's correction bias only
      chooses; larger would pin every token to the same experts);
    - vectors named ``*weight`` or ``*scale`` (norms, scales): uniform [0.5, 1.5];
    - every other vector (attention sinks, mixing bases): standard normal;
    - an integer ``[vocab, k]`` table (hash routing): k distinct experts a row.
    """
    from mlx.utils import tree_flatten, tree_unflatten

    params = []
    for name, value in tree_flatten(model.parameters()):
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        leaf = name.rsplit(".", 1)[-1].lower()
        if mx.issubdtype(value.dtype, mx.floating):
            shape = value.shape
            if value.ndim >= 2:
                new = rng.normal(0.0, shape[-1] ** -0.5, shape)
            elif "bias" in leaf:
                new = 0.1 * rng.normal(size=shape)
            elif leaf.endswith(("weight", "scale")):
                new = rng.uniform(0.5, 1.5, shape)
            else:
                new = rng.normal(size=shape)
            value = mx.array(new.astype(np.float32))
        elif value.ndim == 2 and mx.issubdtype(value.dtype, mx.integer) \
                and 0 < value.shape[1] <= experts:
            table = np.argsort(rng.random((value.shape[0], experts)), axis=-1)[:, :value.shape[1]]
            value = mx.array(table.astype(np.int32), dtype=value.dtype)
        params.append((name, value))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())


def build(variant: Variant, args, seed: int):
    cls = model_class(variant)
    model = instantiate(cls, args, 0)
    if model is None:
        raise TypeError(f"cannot call {cls.__name__}(args)")
    experts = getattr(args, alias(type(args), "experts") or "", None) or Setting().n_experts
    fill_weights(model, seed, experts)
    return model


def tokens_for(args, seed: int) -> list[int]:
    vocab = getattr(args, alias(type(args), "vocab") or "", None) or 64
    return np.random.default_rng([seed, 1]).integers(0, vocab, PREFILL + DECODE).tolist()


def reduction_length(model) -> int:
    """R: the fan-ins of every matrix the forward multiplies by, summed (each
    module once, an expert stack once; embeddings are lookups, not sums)."""
    total = 0
    for _, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            continue
        for value in module.values():
            if isinstance(value, mx.array) and value.ndim >= 2 \
                    and mx.issubdtype(value.dtype, mx.floating):
                total += value.shape[-1]
    return max(total, 1)


def parameter_bytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()) if isinstance(v, mx.array))


def make_cache(model):
    if callable(getattr(model, "make_cache", None)):
        return model.make_cache()
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model)


def call_shard(model, group) -> None:
    """``shard(group)`` when it takes an argument, else ``shard()``."""
    try:
        params = [p for p in inspect.signature(model.shard).parameters.values()
                  if p.kind not in (p.VAR_KEYWORD,)]
    except (TypeError, ValueError):
        params = None
    if params is None:
        try:
            model.shard(group)
        except TypeError:
            model.shard()
    elif params:
        model.shard(group)
    else:
        model.shard()


# --- running and recording ---------------------------------------------------------------


def step_name(step: int) -> str:
    return f"the prefill ({PREFILL} tokens)" if step == 0 else f"decode step {step}"


def parent_path(path: str, paths: set[str]) -> str | None:
    parts = path.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:cut])
        if prefix in paths:
            return prefix
    return None


def recorded_paths(model, moe_cls) -> list[str]:
    """The decoder layers (the modules holding a MoE block, else ``layers.N``)
    and each of their sublayers: outputs a tensor-parallel Model keeps whole
    on every rank, so they compare with the unsharded ones."""
    modules = dict(model.named_modules())
    paths = set(modules)
    layers = set()
    if moe_cls is not None:
        for path, module in modules.items():
            if isinstance(module, moe_cls) and path:
                owner = parent_path(path, paths)
                if owner:
                    layers.add(owner)
    if not layers:
        layers = {p for p in paths if re.search(r"(^|\.)layers\.\d+$", p)}
    subs = {p for p in paths if parent_path(p, paths) in layers}
    return sorted(layers | subs)


def own_call(cls) -> bool:
    return any("__call__" in vars(k) for k in cls.__mro__ if k is not object and k is not dict)


@contextlib.contextmanager
def instrumented(model, record: set[str]):
    """While active, every module call of ``model`` marks an exception that
    leaves it with the module's path (the innermost one wins), and calls of
    the modules in ``record`` keep their outputs in ``state["out"]``, in the
    order they return, keyed by (step, path, call, item)."""
    paths = {id(m): p for p, m in model.named_modules()}
    state = {"step": 0, "calls": {}, "out": {}}
    classes = [c for c in dict.fromkeys(type(m) for _, m in model.named_modules()) if own_call(c)]
    saved = []

    def wrap(cls, original):
        def call(self, *args, **kwargs):
            if type(self) is not cls:
                return original(self, *args, **kwargs)
            path = paths.get(id(self))
            try:
                out = original(self, *args, **kwargs)
            except Exception as error:
                if path is not None and getattr(error, "dsv4shard_module", None) is None:
                    try:
                        error.dsv4shard_module = path
                    except AttributeError:
                        pass
                raise
            if path in record:
                key = (state["step"], path)
                n = state["calls"].get(key, 0)
                state["calls"][key] = n + 1
                items = out if isinstance(out, (tuple, list)) else (out,)
                for i, item in enumerate(items):
                    if isinstance(item, mx.array) and mx.issubdtype(item.dtype, mx.floating):
                        state["out"][f"{state['step']}|{path}|{n}|{i}"] = item
            return out

        return call

    try:
        for cls in classes:
            saved.append((cls, vars(cls).get("__call__")))
            cls.__call__ = wrap(cls, cls.__call__)
        yield state
    finally:
        for cls, original in reversed(saved):
            if original is None:
                delattr(cls, "__call__")
            else:
                cls.__call__ = original


def forward(model, tokens: list[int], state: dict) -> list[mx.array]:
    """Logits of the prefill, then of each decode step, through the Model's cache."""
    cache = make_cache(model)
    steps = [tokens[:PREFILL]] + [[t] for t in tokens[PREFILL:]]
    logits = []
    for step, chunk in enumerate(steps):
        state["step"] = step
        x = mx.array([chunk], dtype=mx.int32)
        try:
            out = model(x, cache=cache)
        except TypeError as error:
            if "cache" not in str(error):
                raise
            out = model(x, cache)
        mx.eval(out)
        logits.append(out)
    return logits


# --- discrete decisions -----------------------------------------------------------------


@contextlib.contextmanager
def watch_discrete(tau: float):
    """While active, every discrete decision the forward takes through
    ``mx`` (argpartition / argsort / argmax / argmin on floats: expert and
    indexer top-k; to_fp8, round, floor, ceil: fake quantization) is checked
    for a near-tie: a gap of at most ``tau`` times the scale of its input, or
    a rounding that changes when the input moves by ``tau`` of its size.
    The yielded list collects one line per near-tie."""
    ties: list[str] = []
    originals = {}

    def floats(a):
        return isinstance(a, mx.array) and mx.issubdtype(a.dtype, mx.floating) and a.size

    def sorted_axis(a, axis):
        v = to_numpy(a)
        if axis is None:
            v, axis = v.reshape(-1), -1
        return np.sort(np.moveaxis(v, axis, -1), axis=-1)

    def gaps_small(lo, hi, scale):
        finite = np.isfinite(lo) & np.isfinite(hi)
        with np.errstate(invalid="ignore"):
            return finite & (hi - lo <= tau * scale)

    def scale_of(s):
        finite = np.where(np.isfinite(s), np.abs(s), 0.0)
        return finite.max(axis=-1, keepdims=True)

    def partition(a, kth, axis=-1, **kw):
        s = sorted_axis(a, axis)
        n = s.shape[-1]
        k = kth % n
        if k + 1 < n and gaps_small(s[..., k:k + 1], s[..., k + 1:k + 2], scale_of(s)).any():
            ties.append(f"argpartition at kth={kth} of {n}")

    def order(a, axis=-1, **kw):
        s = sorted_axis(a, axis)
        if s.shape[-1] > 1 and gaps_small(s[..., :-1], s[..., 1:], scale_of(s)).any():
            ties.append(f"argsort of {s.shape[-1]}")

    def extreme(name):
        def check(a, axis=None, **kw):
            s = sorted_axis(a, axis)
            ends = (s[..., :2] if name == "argmin" else s[..., -2:])
            if s.shape[-1] > 1 and gaps_small(ends[..., :1], ends[..., 1:], scale_of(s)).any():
                ties.append(f"{name} of {s.shape[-1]}")
        return check

    def rounding(name):
        def check(a, *args, **kw):
            op = originals[name]
            rms = mx.sqrt(mx.mean(mx.square(a.astype(mx.float32))))
            step = tau * (mx.abs(a) + rms).astype(a.dtype)
            base = op(a, *args, **kw)
            moved = mx.logical_or(op(a + step, *args, **kw) != base,
                                  op(a - step, *args, **kw) != base)
            count = int(mx.sum(moved).item())
            if count:
                ties.append(f"{name} of {count} of {a.size} values")
        return check

    checks = {"argpartition": partition, "argsort": order, "argmax": extreme("argmax"),
              "argmin": extreme("argmin"), "to_fp8": rounding("to_fp8"),
              "round": rounding("round"), "floor": rounding("floor"), "ceil": rounding("ceil")}

    def watched(name, original, check):
        def call(a, *args, **kwargs):
            out = original(a, *args, **kwargs)
            if floats(a):
                check(a, *args, **kwargs)
            return out
        return call

    try:
        for name, check in checks.items():
            original = getattr(mx, name, None)
            if original is None:
                continue
            originals[name] = original
            setattr(mx, name, watched(name, original, check))
        yield ties
    finally:
        for name, original in originals.items():
            setattr(mx, name, original)


# --- the bound -------------------------------------------------------------------------


def bound(want: np.ndarray, r: int) -> float:
    """The float32 bound on |sharded - unsharded| for one output ``want``.

    Sharding changes only the order of float32 additions: a sharded-to-all
    product sums N partial dot products (one all_sum) where the unsharded
    Model sums one, so each such output moves by a rounding of about
    u * sqrt(K) of its scale (K its reduction length; a random walk of
    roundings, SPEC section 6).  Every later operation (norms, matmuls,
    softmax, the hyper-connections) carries that change forward with a gain
    of order one and adds roundings of its own, so the change that reaches an
    output is at most a random walk over every reduction on its path:
    u * sqrt(R) * scale, R the fan-ins of all the Model's matrices summed
    (reduction_length) and scale the output's largest magnitude.  SLACK_ULPS
    = 16 of that (about 700 float32 ulps of the scale for the tiny
    deepseek_v41, R ~ 1900) covers the gains of the layers, the constant of
    the walk and the worst element of many.  Measured with mlx 0.32.4 on the
    CPU, 200 seeds of deepseek_v41 at 2 and at 4 ranks: the largest departure
    of the logits or of any recorded sublayer output was 0.66 u sqrt(R) of
    its scale (4% of the bound) wherever no discrete decision was near a flip
    (see watch_discrete); the one run with such a flip departed by 700 and
    was excluded by that watch.  Rank 0's sinks on every rank depart by more
    than 10^4 times the bound, a missing MoE all_sum likewise.  u is the
    float32 matmul unit roundoff of this backend (TF32 on CUDA).
    """
    u = tolerance.matmul_roundoff("float32")
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    return SLACK_ULPS * u * math.sqrt(r) * scale + tolerance.underflow_floor("float32", 8)


def expect_output(want: np.ndarray, r: int) -> tolerance.Expected:
    """The expected side of one compared output (logits, or a recorded
    sublayer output): the unsharded Model's, within :func:`bound`."""
    want = np.asarray(want, np.float64)
    return tolerance.Expected(want, np.full(want.shape, bound(want, r)),
                              tolerance.arithmetic("float32"))


# --- the rank side --------------------------------------------------------------------


def frames_in(tb_frames, files: set[str]):
    return [f for f in tb_frames if str(Path(f.filename).resolve()) in files]


def model_files(variant: Variant, model) -> set[str]:
    """The files of the variant and of the classes its Model is built from."""
    files = set()
    source = getattr(variant.module, "__file__", None)
    if source:
        files.add(str(Path(source).resolve()))
    for _, module in model.named_modules():
        try:
            files.add(str(Path(inspect.getfile(type(module))).resolve()))
        except (TypeError, OSError):
            pass
    return files


def crash_report(error: BaseException, stage: str, step: int | None, variant: Variant,
                 model) -> dict:
    """Where a rank failed: the module whose call raised, the MLX operation
    (``[op]`` of MLX's message), the deepest frame in the variant's own file
    (else in the files its Model's classes come from)."""
    text = one_line(str(error)) or type(error).__name__
    found = re.match(r"\[([A-Za-z_][\w:.]*)\]", text)
    tb = traceback.extract_tb(error.__traceback__)
    own = str(Path(variant.module.__file__).resolve()) if getattr(
        variant.module, "__file__", None) else None
    frames = frames_in(tb, {own} if own else set()) or frames_in(tb, model_files(variant, model))
    frame = frames[-1] if frames else (tb[-1] if tb else None)
    return {"stage": stage, "step": step, "module": getattr(error, "dsv4shard_module", None),
            "op": found.group(1) if found else None, "error": type(error).__name__,
            "message": text[:400],
            "frame": (f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"
                      if frame else None)}


def replaced_collectives() -> list[str]:
    """The ``mx.distributed`` functions this process no longer has as MLX
    built them (a port may replace all_sum at import, SPEC section 7)."""
    return sorted(name for name in dir(mx.distributed)
                  if not name.startswith("_") and isinstance(getattr(mx.distributed, name),
                                                              types.FunctionType))


class ShardedForwardError(RuntimeError):
    """A rank's shard() or sharded forward raised; the message is a MARKER line."""


def rank_job(job: dict, group) -> dict:
    """One rank's part (runs in a rank process; see dsv4shard.ranks.worker):
    build, shard, run; the logits of every step and the recorded outputs.
    ``changed``: collectives an earlier job's import replaced in this rank
    process before this job's variant was loaded (the answer is then not
    this variant's alone)."""
    changed = replaced_collectives()
    variant = Variant(job["variant"])
    args = tiny_args(variant, job["ranks"], job.get("overrides"))
    model = build(variant, args, job["seed"])
    record = set(recorded_paths(model, moe_class(variant)))
    stage, step, state = "shard", None, {"step": None}
    whole = parameter_bytes(model)
    try:
        call_shard(model, group)
        mx.eval(model.parameters())
        held = parameter_bytes(model)
        stage = "forward"
        with instrumented(model, record) as state:
            logits = forward(model, job["tokens"], state)
            step = state["step"]
        outs = state["out"]
        mx.eval(list(outs.values()))
    except Exception as error:
        if stage == "forward":
            step = state["step"]
        report = {**crash_report(error, stage, step, variant, model), "rank": group.rank(),
                  "job": job.get("job")}
        line = MARKER + json.dumps(report)
        print(line, file=sys.stderr, flush=True)  # for a pool that times out on the others
        if isinstance(error, NotImplementedError) and stage == "shard":
            raise NotImplementedError(line) from error
        raise ShardedForwardError(line) from error
    return {"logits": [wire.encode_array(to_numpy(x)) for x in logits],
            "records": {k: wire.encode_array(to_numpy(v)) for k, v in outs.items()},
            "bytes": [held, whole], "changed": changed}


# --- the test-process side ----------------------------------------------------------------


def unsharded(variant: Variant, args, seed: int, tau: float | None):
    """(model, logits per step, records, near-ties) of the unsharded Model."""
    model = build(variant, args, seed)
    record = set(recorded_paths(model, moe_class(variant)))
    watch = watch_discrete(tau) if tau is not None else contextlib.nullcontext([])
    with watch as ties, instrumented(model, record) as state:
        logits = forward(model, tokens_for(args, seed), state)
    mx.eval(list(state["out"].values()))
    records = {k: to_numpy(v) for k, v in state["out"].items()}
    return model, [to_numpy(x) for x in logits], records, list(ties)


def crash_departure(error, ranks: int, job: str, model, moe_cls) -> Exception:
    """A Departure (or NotImplementedError, a declined shard()) from a
    RankFailure: the report a rank made for this job (a rank's stderr may
    hold reports of earlier jobs too), else the traceback's last error."""
    text = str(error)
    found = None
    for line in text.splitlines():
        at = line.find(MARKER)
        if at >= 0:
            try:
                report = json.loads(line[at + len(MARKER):])
            except ValueError:
                continue
            if report.get("job") == job:
                found = report
                break
    if found is None:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        cause = next((ln for ln in reversed(lines) if "Error" in ln), lines[0] if lines else "")
        return Departure(f"sharding the whole Model over {ranks} ranks failed: {cause}")
    who = f"rank {found.get('rank', '?')} of {ranks}"
    if found["stage"] == "shard":
        if found["error"] == "NotImplementedError":
            return NotImplementedError(f"shard() declines: {found['message']}")
        frame = f" (at {found['frame']})" if found.get("frame") else ""
        return Departure(f"shard() failed on {who}: {found['error']}: {found['message']}{frame}")
    where = f"in {found['module']}" if found.get("module") else "outside any module call"
    op = found.get("op") or found.get("error")
    context = [who]
    if found.get("step") is not None:
        context.append(step_name(found["step"]))
    if found.get("module"):
        context.append(f"module: {sublayer_kind(found['module'], model, moe_cls)}")
    if found.get("frame"):
        context.append(found["frame"])
    return Departure(f"sharded forward failed {where} ({op}): {found['message']} "
                     f"[{'; '.join(context)}]")


def part_kind(path: str, module, moe_cls) -> str | None:
    name = type(module).__name__
    if moe_cls is not None and isinstance(module, moe_cls):
        return "MoE block"
    last = path.rsplit(".", 1)[-1].lower()
    if "attn" in last or "attention" in last or "attention" in name.lower():
        return "attention"
    return None


def sublayer_kind(path: str, model, moe_cls) -> str:
    """What the module at ``path`` is, in words: "attention, Attention", or
    "Linear in the attention" for a module inside one."""
    modules = dict(model.named_modules())
    module = modules.get(path)
    if module is None:
        return "module"
    name = type(module).__name__
    kind = part_kind(path, module, moe_cls)
    if kind:
        return f"{kind}, {name}"
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in modules and (outer := part_kind(prefix, modules[prefix], moe_cls)):
            return f"{name} in the {outer}"
    return name


def first_departure(got: dict, want: dict, r: int, model, moe_cls) -> str | None:
    """The first recorded output (in the unsharded Model's order) that is
    missing, reshaped or outside its bound on a rank."""
    for key, w in want.items():
        step, path, call, item = key.split("|")
        where = (f"{path} ({sublayer_kind(path, model, moe_cls)}) at {step_name(int(step))}"
                 f"{f', output {item}' if item != '0' else ''}"
                 f"{f', call {int(call) + 1}' if call != '0' else ''}")
        if key not in got:
            return f"{where} is not called on the rank"
        g = wire.decode_array(got[key])
        if g.shape != w.shape:
            return f"{where} returns shape {g.shape}, unsharded {w.shape}"
        bad = expect_output(w, r).check(g)
        if bad:
            return f"{where}: {bad}"
    return None


def check(variant: Variant, ranks: int = 2, pool=None, overrides: dict | None = None) -> str:
    """The variant's whole tiny Model (attention included) sharded by its own
    ``shard()`` over ``ranks`` real ranks gives, on every rank and at every
    step (a prefill, then decode steps through its cache), the unsharded
    Model's logits.  ``overrides``: ModelArgs fields to set on the tiny
    configuration (head counts are already made multiples of ``ranks``).
    ``pool``: a running RankPool of ``ranks`` ranks; by default the session's
    shared pool, started afresh (once) when an earlier job's import has
    replaced collectives in its processes.

    Returns a one-line detail; raises Departure (a crash names the module
    and the MLX operation, a wrong answer the first sublayer that departs),
    NotApplicable (no shard(), an in-memory module, a Model that does not
    build or run unsharded here, no rank processes), or NotImplementedError
    when shard() declines.  Runs where ``backend.model_device`` says
    (mx.cpu where float32 matmuls round to TF32), the ranks too."""
    device = model_device()
    with on_model_device(device):
        return _check(variant, ranks, pool, overrides, device)


def _check(variant: Variant, ranks: int, pool, overrides: dict | None, device: str) -> str:
    from dsv4shard.ranks.pool import RankFailure

    if not isinstance(variant, Variant):
        variant = Variant(variant)
    cls = model_class(variant)
    if cls is None or not callable(getattr(cls, "shard", None)):
        raise NotApplicable("the variant's Model has no shard()")
    spec = worker_spec(variant)
    if spec is None:
        raise NotApplicable("the variant is an in-memory module (or a private copy): rank "
                            "processes load it by name or path")
    try:
        fields = {f.name for f in dataclasses.fields(variant.args_cls)}
    except StructureError as error:
        raise NotApplicable(f"a tiny {cls.__name__} does not build here: {error}") from None
    unknown = sorted(set(overrides or {}) - fields)
    if unknown:
        raise ValueError(f"overrides name no field of ModelArgs: {', '.join(unknown)}")
    try:
        args = tiny_args(variant, ranks, overrides)
        model = build(variant, args, SEEDS[0])
    except Exception as error:
        raise NotApplicable(f"a tiny {cls.__name__} does not build here: "
                            f"{type(error).__name__}: {one_line(error)}") from None
    r = reduction_length(model)
    # Discrete decisions (expert top-k, indexer top-k, the fp8 fake quantization
    # of the KV) see values that sharding has moved by up to ~0.7 u sqrt(R) of
    # their scale (see bound()), so one within TIE_ULPS u sqrt(R) of a flip may
    # rightly go the other way on a rank.  A flip in one layer changes every
    # later layer and, through the cache, every later token, so no part of such
    # a run can be compared: the seed is discarded and the next one tried (with
    # TIE_ULPS = 4, about 40% of deepseek_v41's seeds are free of near-ties).
    tau = TIE_ULPS * tolerance.matmul_roundoff("float32") * math.sqrt(r)
    tried = []
    for seed in SEEDS:
        try:
            model, want, records, ties = unsharded(variant, args, seed, tau)
        except Exception as error:
            raise NotApplicable(f"the unsharded tiny {cls.__name__} does not run here: "
                                f"{type(error).__name__}: {one_line(error)}") from None
        if not ties:
            break
        tried.append(f"seed {seed}: {ties[0]}")
    else:
        raise NotApplicable(f"every seed leaves a discrete decision within {tau:.1e} of a "
                            f"flip, so the ranks may rightly choose otherwise: {tried[0]}")
    if pool is not None and getattr(pool, "size", ranks) != ranks:
        raise ValueError(f"a pool of {pool.size} ranks given for a check over {ranks}")
    job = {"task": "variant_model", "variant": spec, "seed": seed, "ranks": ranks,
           "overrides": overrides or {}, "tokens": tokens_for(args, seed),
           "job": secrets.token_hex(6), "device": device}
    own_pool = pool is None
    for attempt in range(2):
        if pool is None:
            pool = local_pool(ranks)
        try:
            answers = pool.run(job, timeout=TIMEOUT)
        except RankFailure as error:
            raise crash_departure(error, ranks, job["job"], model, moe_class(variant)) from None
        changed = sorted({n for a in answers for n in a.get("changed", [])})
        if not changed:
            break
        if not own_pool or attempt:
            raise NotApplicable(f"the rank processes had mx.distributed.{', '.join(changed)} "
                                f"replaced by an earlier job's import: their answer is not "
                                f"this variant's alone (use fresh ranks)")
        pool.close()  # a shared pool an earlier variant changed: start it afresh, once
        pool = None
    sizes = sorted({a.get("size") for a in answers}, key=str)
    if sizes != [ranks] or len(answers) != ranks:
        raise Departure(f"group sizes {sizes} from {len(answers)} ranks, expected {ranks}: "
                        f"the check would pass vacuously")
    held = [a["bytes"][0] / a["bytes"][1] for a in answers]
    for rank, share in enumerate(held):
        if share >= 1.0:
            raise Departure(f"shard() over {ranks} ranks left rank {rank} every parameter "
                            f"whole: nothing was sharded, so the comparison would be vacuous")
    moe_cls = moe_class(variant)
    for a in answers:
        rank = a.get("rank")
        got = [wire.decode_array(x) for x in a["logits"]]
        for step, (g, w) in enumerate(zip(got, want)):
            if g.shape != w.shape:
                raise Departure(f"rank {rank} of {ranks}: logits of shape {g.shape} at "
                                f"{step_name(step)}, unsharded {w.shape}")
            bad = expect_output(w, r).check(g)
            if bad:
                where = first_departure(a["records"], records, r, model, moe_cls)
                first = (f"the sharded Model first departs in {where}; " if where else
                         "every decoder layer and sublayer output is within bound, ")
                raise Departure(f"rank {rank} of {ranks}: {first}its logits differ at "
                                f"{step_name(step)}: {bad}")
    backend = getattr(getattr(pool, "hostfile", None), "backend", "ranks")
    return (f"every rank of {ranks} ({backend}) gives the unsharded logits at the "
            f"prefill and {DECODE} decode steps, holding {max(held):.0%} of the parameter "
            f"bytes at most (seed {seed}, bound {SLACK_ULPS} u * sqrt({r}) of each step's "
            f"scale){model_device_note(device)}")
