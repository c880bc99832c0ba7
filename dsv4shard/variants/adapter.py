"""The structural adapter: a variant's own MoE block, built tiny, with the
reference's weights in it, called the way its signature asks.

Nothing here depends on a variant's attribute names.  The adapter builds
every ``nn.Module`` class the variant's file defines from a tiny
configuration derived from the variant's own ``ModelArgs``, and recognises
the parts by their shapes:

- routed experts: a module with gate/up/down projections (``gate_proj`` /
  ``w1``, ``up_proj`` / ``w3``, ``down_proj`` / ``w2``) whose weights are 3-D,
  ``[E, I, D]`` and ``[E, D, I]``;
- shared expert: the same projections, 2-D;
- router: a module holding a float ``[E, D]`` matrix (and, when present, a
  float ``[E]`` correction bias and an integer ``[vocab, k]`` token table).

The MoE block is the smallest class whose instance holds all three.  Its
router may return ``(indices, weights)`` or ``(weights, indices)`` (told apart
by dtype), and its call may be ``(x)`` or ``(x, input_ids)`` (told apart by
signature).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass, field
from types import ModuleType

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from dsv4shard.variants.loading import describe, load_module
from dsv4shard.weights import DTYPES, dense_weight, to_numpy
from reference.moe_block import MoEConfig, MoEWeights, Revision
from reference.quantization import QuantFormat

# Tiny sizes: D = 2 I lets one token probe I (gate, up) pairs at once; both
# divide by the 32 of mxfp4 groups; I / 2 ranks stays whole.
HIDDEN, INTER, EXPERTS, TOP_K, VOCAB = 64, 32, 8, 2, 97

# ModelArgs fields, by what they mean; a variant may use any of the names.
ALIASES = {
    "hidden": ("hidden_size", "dim", "d_model"),
    "inter": ("moe_intermediate_size", "moe_inter_dim"),
    "experts": ("n_routed_experts", "num_experts", "n_experts", "num_local_experts"),
    "top_k": ("num_experts_per_tok", "n_activated_experts", "top_k", "moe_top_k"),
    "limit": ("swiglu_limit",),
    "score_func": ("scoring_func", "score_func"),
    "route_scale": ("routed_scaling_factor", "route_scale"),
    "hash_layers": ("num_hash_layers", "n_hash_layers"),
    "vocab": ("vocab_size",),
}
# DeepSeek-V4's own settings of the routing fields, so a port is checked as a
# V4 checkpoint would run it; and one shared expert, no expert groups.
CHECKPOINT = {"n_shared_experts": 1, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
              "topk_method": "noaux_tc", "first_k_dense_replace": 0, "moe_layer_freq": 1,
              "gate_temp": 1.0, "num_hidden_layers": 2}
# Attention and the rest, shrunk so that a whole tiny Model builds quickly
# (every head count even, so that a 2-rank shard() divides it).
SHRINK = {"intermediate_size": INTER, "num_attention_heads": 2, "num_key_value_heads": 2,
          "head_dim": 32, "q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 16,
          "qk_nope_head_dim": 16, "v_head_dim": 32, "o_groups": 2, "o_lora_rank": 32,
          "index_n_heads": 2, "index_head_dim": 16, "index_topk": 8, "hc_mult": 2,
          "sliding_window": 16, "max_position_embeddings": 256,
          "num_nextn_predict_layers": 0, "engram_layer_ids": ()}

ARGS_NAMES = {"args", "config", "cfg", "model_args", "params", "configuration"}
LAYER_NAMES = {"layer_idx", "layer_id", "layer", "layer_index", "idx", "layer_number",
               "layer_no", "i", "index"}
PROJECTIONS = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}
DEEPSEEK = {"gate": "w1", "up": "w3", "down": "w2"}


class StructureError(RuntimeError):
    """The adapter cannot find or drive the variant's MoE block."""


@dataclass(frozen=True)
class Setting:
    """What the tiny configuration asks of the variant's ModelArgs."""

    top_k: int = TOP_K
    n_experts: int = EXPERTS
    limit: float | None = 10.0  # None: the ModelArgs field set to None
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.5
    hash_layer: bool = False  # build the first layer, a hash layer

    def config(self, revision: Revision = Revision.SHARED_CLIPPED) -> MoEConfig:
        limit = 0.0 if self.limit is None else self.limit  # None: no clip
        return MoEConfig(HIDDEN, INTER, self.n_experts, self.top_k, limit,
                         self.route_scale, self.score_func, hash_routing=self.hash_layer,
                         vocab_size=VOCAB if self.hash_layer else 0, revision=revision)


# --- tree helpers ---------------------------------------------------------------


def child(module, key: str):
    if isinstance(module, (list, tuple)):
        return module[int(key)]
    if isinstance(module, dict):
        return module[key]
    return getattr(module, key)


def get_path(root, path: str):
    node = root
    for key in filter(None, path.split(".")):
        node = child(node, key)
    return node


def set_path(root, path: str, value) -> None:
    parent_path, _, key = path.rpartition(".")
    parent = get_path(root, parent_path)
    if isinstance(parent, list):
        parent[int(key)] = value
    else:
        parent[key] = value


def own_arrays(module) -> dict[str, mx.array]:
    return {k: v for k, v in module.items() if isinstance(v, mx.array)}


def is_quantized(layer) -> bool:
    return "scales" in layer


def logical_shape(layer) -> tuple[int, ...]:
    """A (quantized) projection's weight shape in values, not packed words."""
    shape = tuple(layer["weight"].shape)
    if is_quantized(layer):
        return shape[:-1] + (layer["scales"].shape[-1] * layer.group_size,)
    return shape


def projections(module) -> dict[str, str] | None:
    """{role: attribute} when ``module`` holds gate, up and down projections."""
    if not isinstance(module, nn.Module):
        return None
    found = {}
    for role, names in PROJECTIONS.items():
        for name in names:
            layer = module.get(name) if isinstance(module, dict) else None
            if isinstance(layer, nn.Module) and isinstance(layer.get("weight"), mx.array):
                found[role] = name
                break
    return found if len(found) == 3 else None


def quant_format(layer) -> QuantFormat | None:
    if not is_quantized(layer):
        return None
    return QuantFormat(layer.mode, layer.group_size, layer.bits,
                       getattr(layer, "global_scale", None) is not None)


# --- ModelArgs ---------------------------------------------------------------------


def find_args_class(module: ModuleType):
    cls = getattr(module, "ModelArgs", None)
    if isinstance(cls, type) and dataclasses.is_dataclass(cls):
        if not any(f.name in ALIASES["experts"] for f in dataclasses.fields(cls)):
            raise StructureError(f"{source_name(module)}'s ModelArgs has no expert count (any of "
                                 f"{', '.join(ALIASES['experts'])}): not a mixture-of-experts "
                                 f"model")
        return cls
    for value in vars(module).values():
        if (isinstance(value, type) and dataclasses.is_dataclass(value)
                and value.__module__ == module.__name__
                and any(f.name in ALIASES["experts"] for f in dataclasses.fields(value))):
            return value
    raise StructureError(f"{source_name(module)} defines no ModelArgs dataclass (with an "
                         f"expert count such as n_routed_experts)")


def field_names(args_cls) -> set[str]:
    return {f.name for f in dataclasses.fields(args_cls)}


def alias(args_cls, meaning: str) -> str | None:
    names = field_names(args_cls)
    return next((n for n in ALIASES[meaning] if n in names), None)


def _zero_ratios(args_cls, layers: int):
    for f in dataclasses.fields(args_cls):
        if f.name == "compress_ratios":
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else [])
            return type(default)([0] * layers) if isinstance(default, (list, tuple)) else None
    return None


def make_args(args_cls, setting: Setting):
    """The variant's ModelArgs, tiny, with ``setting``'s routing."""
    values = {"hidden": HIDDEN, "inter": INTER, "experts": setting.n_experts,
              "top_k": setting.top_k, "limit": setting.limit, "score_func": setting.score_func,
              "route_scale": setting.route_scale, "hash_layers": 1, "vocab": VOCAB}
    names = field_names(args_cls)
    kwargs = {}
    for meaning, value in values.items():
        name = alias(args_cls, meaning)
        if name is not None:
            kwargs[name] = value
    kwargs.update({k: v for k, v in CHECKPOINT.items() if k in names})
    shrink = {k: v for k, v in SHRINK.items() if k in names}
    ratios = _zero_ratios(args_cls, CHECKPOINT["num_hidden_layers"])
    if ratios is not None:
        shrink["compress_ratios"] = ratios
    try:
        return args_cls(**kwargs, **shrink)
    except Exception:  # a shrink value its checks refuse: keep its own defaults
        return args_cls(**kwargs)


# --- discovery ------------------------------------------------------------------------


def ctor_kwargs(cls, args, layer: int) -> dict | None:
    """Keyword arguments for ``cls(...)``: the args, the layer index; None when
    the constructor wants something else."""
    try:
        params = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):
        return None
    kwargs = {}
    for i, p in enumerate(params):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        name = p.name.lower()
        if name in ARGS_NAMES or (isinstance(p.annotation, type) and isinstance(args, p.annotation)) \
                or (isinstance(p.annotation, str) and p.annotation.strip("'\"") == type(args).__name__):
            kwargs[p.name] = args
        elif name in LAYER_NAMES:
            kwargs[p.name] = layer
        elif p.default is not p.empty:
            continue
        elif i == 0:
            kwargs[p.name] = args
        else:
            return None
    return kwargs


def layer_parameter(cls) -> str | None:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return None
    return next((n for n in params if n.lower() in LAYER_NAMES), None)


def instantiate(cls, args, layer: int):
    kwargs = ctor_kwargs(cls, args, layer)
    if kwargs is None:
        return None
    return cls(**kwargs)


def module_classes(module: ModuleType) -> list[type]:
    return [v for v in vars(module).values()
            if isinstance(v, type) and issubclass(v, nn.Module) and v.__module__ == module.__name__]


@dataclass
class Parts:
    routers: list[str] = field(default_factory=list)
    routed: list[str] = field(default_factory=list)
    shared: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return bool(self.routers) and len(self.routed) == 1 and bool(self.shared)


def router_arrays(module, experts: int) -> dict[str, str] | None:
    """{"weight": key, "bias": key, "table": key} for a router-shaped module."""
    arrays = own_arrays(module)
    weight = next((k for k, v in arrays.items() if v.ndim == 2 and tuple(v.shape) == (experts, HIDDEN)
                   and mx.issubdtype(v.dtype, mx.floating)), None)
    if weight is None:
        return None
    found = {"weight": weight}
    bias = [k for k, v in arrays.items() if v.ndim == 1 and v.shape[0] == experts
            and mx.issubdtype(v.dtype, mx.floating)]
    if bias:
        found["bias"] = next((k for k in bias if "bias" in k), bias[0])
    table = [k for k, v in arrays.items() if v.ndim == 2 and mx.issubdtype(v.dtype, mx.integer)]
    if table:
        found["table"] = table[0]
    return found


def find_parts(instance, experts: int) -> Parts:
    parts = Parts()
    inside_mlp: list[str] = []
    for path, module in instance.named_modules():
        roles = projections(module)
        if roles:
            shapes = [logical_shape(module[roles[r]]) for r in ("gate", "up", "down")]
            if all(len(s) == 3 and s[0] == experts for s in shapes) and \
                    shapes[0][1:] == shapes[1][1:] and shapes[2][1:] == shapes[0][1:][::-1]:
                parts.routed.append(path)
            elif all(len(s) == 2 for s in shapes) and shapes[0] == shapes[1] \
                    and shapes[2] == shapes[0][::-1] and shapes[0][1] == HIDDEN:
                parts.shared.append(path)
            inside_mlp.append(path)
    for path, module in instance.named_modules():
        if any(path == p or path.startswith(p + ".") for p in inside_mlp):
            continue
        if router_arrays(module, experts):
            parts.routers.append(path)
    return parts


def pick_router(paths: list[str], root) -> str:
    def score(path):
        arrays = router_arrays(get_path(root, path), EXPERTS) or {}
        return (-len(arrays), not any(w in path.lower() for w in ("gate", "router")), len(path))

    return min(paths, key=score)


@dataclass
class Layout:
    moe_cls: type
    layer_param: str | None  # the constructor's layer-index parameter
    layer_attr: str | None  # where a decoder layer holds the MoE block
    router: str
    routed: str
    shared: str
    model_cls: type | None
    tried: dict[str, str] = field(default_factory=dict)  # class -> why it is not the block

    def path(self, part: str) -> str:
        inner = getattr(self, part)
        return ".".join(p for p in (self.layer_attr, inner) if p) or "(the block itself)"


def source_name(module: ModuleType) -> str:
    return getattr(module, "__dsv4shard_source__", module.__name__)


def discover(module: ModuleType, args_cls) -> Layout:
    hash_field = alias(args_cls, "hash_layers")
    args = make_args(args_cls, Setting())
    score_layer = 1 if hash_field else 0
    instances, tried = {}, {}
    for cls in module_classes(module):
        try:
            inst = instantiate(cls, args, score_layer)
        except Exception as error:  # a class that wants other arguments: not the block
            tried[cls.__name__] = f"{type(error).__name__}: {error}"
            continue
        if inst is None:
            tried[cls.__name__] = "constructor wants arguments other than the args and a layer"
            continue
        instances[cls] = inst
    candidates = []
    for cls, inst in instances.items():
        parts = find_parts(inst, EXPERTS)
        if parts.complete:
            candidates.append((len(inst.named_modules()), cls, parts))
        else:
            tried.setdefault(cls.__name__, f"routers {parts.routers}, routed experts "
                                           f"{parts.routed}, shared experts {parts.shared}")
    if not candidates:
        partial = {cls.__name__: find_parts(inst, EXPERTS) for cls, inst in instances.items()}
        closest = sorted(((len(instances[c].named_modules()), n, p) for c, (n, p) in
                          zip(instances, partial.items())
                          if p.routers or p.routed or p.shared))[:3]
        seen = "; ".join(f"{n} holds router {p.routers or 'none'}, routed experts "
                         f"{p.routed or 'none'}, shared expert {p.shared or 'none'}"
                         for _, n, p in closest) or "no class holds any of them"
        raise StructureError(
            f"no class of {source_name(module)} holds all of a router ([E, D] matrix), one "
            f"routed-expert module (3-D gate/up/down) and a shared expert (2-D gate/up/down): "
            f"{seen}")
    _, moe_cls, parts = min(candidates, key=lambda c: c[0])
    moe = instances[moe_cls]
    layer_attr = None
    for cls, inst in sorted(instances.items(), key=lambda kv: len(kv[1].named_modules())):
        if cls is moe_cls:
            continue
        attr = next((k for k, v in inst.items() if isinstance(v, moe_cls)), None)
        if attr:
            layer_attr = attr
            break
    model_cls = getattr(module, "Model", None)
    model_cls = model_cls if isinstance(model_cls, type) else None
    return Layout(moe_cls, layer_parameter(moe_cls), layer_attr, pick_router(parts.routers, moe),
                  parts.routed[0], parts.shared[0], model_cls, tried)


# --- calling by signature ----------------------------------------------------------


def call_parameters(fn) -> list[inspect.Parameter]:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return []
    return [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def takes_ids(fn) -> bool:
    """Whether a call (after x) takes token ids: its next parameter is named
    for them, or is required."""
    params = call_parameters(fn)[1:]
    if not params:
        return False
    p = params[0]
    name = p.name.lower()
    return "id" in name or "token" in name or p.default is p.empty


def signature_text(fn) -> str:
    params = call_parameters(fn)
    if not params:
        return "(x)"
    return "(" + ", ".join(p.name if p.default is p.empty else f"{p.name}=…" for p in params) + ")"


def split_route(out, what: str) -> tuple[mx.array, mx.array, str]:
    """(indices, weights, order) from a router's output in either order."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise StructureError(f"{what} returned {type(out).__name__}, not a pair "
                             f"(indices, weights): routing happens elsewhere")
    a, b = out
    a_int, b_int = (mx.issubdtype(t.dtype, mx.integer) for t in (a, b))
    if a_int and not b_int:
        return a, b, "(indices, weights)"
    if b_int and not a_int:
        return b, a, "(weights, indices)"
    raise StructureError(f"{what} returned two arrays of dtypes {a.dtype} and {b.dtype}: "
                         f"cannot tell indices from weights")


# --- a built block -------------------------------------------------------------------


class Built:
    """One tiny instance of the variant's MoE block, driven through its parts."""

    def __init__(self, variant: Variant, setting: Setting, moe, args):
        self.variant, self.setting, self.moe, self.args = variant, setting, moe, args
        layout = variant.layout
        self.router = get_path(moe, layout.router)
        self.keys = router_arrays(self.router, setting.n_experts) or {}
        if "weight" not in self.keys:
            raise StructureError(f"the router at {layout.router} holds no [{setting.n_experts}, "
                                 f"{HIDDEN}] matrix with n_experts={setting.n_experts}")
        self.roles = {"routed": projections(self.routed), "shared": projections(self.shared)}
        # Weights go in before the first call, never after: a port may cache
        # a derived weight on its first call (a transposed router matrix
        # under an underscore attribute), as mlx-lm loads before it runs.
        self.ran = False

    @property
    def routed(self):
        return get_path(self.moe, self.variant.layout.routed)

    @property
    def shared(self):
        return get_path(self.moe, self.variant.layout.shared)

    def projection(self, part: str, role: str):
        return getattr(self, part)[self.roles[part][role]]

    @property
    def has_table(self) -> bool:
        return "table" in self.keys

    @property
    def forced_quant(self) -> QuantFormat | None:
        return quant_format(self.projection("routed", "gate"))

    # --- weights ---

    def load(self, weights: MoEWeights) -> Built:
        if self.ran:
            raise RuntimeError("weights loaded into a block that has already run: build a "
                               "fresh one (a port may cache derived weights on first call)")
        old = self.router[self.keys["weight"]]
        self.router[self.keys["weight"]] = mx.array(weights.gate, dtype=old.dtype)
        if "bias" in self.keys:
            old = self.router[self.keys["bias"]]
            self.router[self.keys["bias"]] = mx.array(weights.bias, dtype=old.dtype)
        if "table" in self.keys and weights.tid2eid is not None:
            old = self.router[self.keys["table"]]
            self.router[self.keys["table"]] = mx.array(weights.tid2eid, dtype=old.dtype)
        for part, prefix in (("routed", ""), ("shared", "shared_")):
            for role in ("gate", "up", "down"):
                set_weight(self.projection(part, role), getattr(weights, prefix + DEEPSEEK[role]))
        mx.eval(self.moe.parameters())
        return self

    def quantize(self, routed: QuantFormat | None, shared: QuantFormat | None) -> Built:
        """Quantize (through mlx's own ``to_quantized``) what is still dense."""
        for part, fmt in (("routed", routed), ("shared", shared)):
            if fmt is None:
                continue
            for role in ("gate", "up", "down"):
                layer = self.projection(part, role)
                if not is_quantized(layer):
                    getattr(self, part)[self.roles[part][role]] = layer.to_quantized(
                        fmt.group_size, fmt.bits, mode=fmt.mode)
        mx.eval(self.moe.parameters())
        return self

    def cast(self, dtype: str) -> Built:
        """Experts' float arrays to ``dtype``; the router stays as it is."""
        target = DTYPES[dtype]
        for part in ("routed", "shared"):
            for _, leaf in getattr(self, part).named_modules():
                for key, value in list(leaf.items()):
                    if (isinstance(value, mx.array) and key != "global_scale"
                            and mx.issubdtype(value.dtype, mx.floating)):
                        leaf[key] = value.astype(target)
        mx.eval(self.moe.parameters())
        return self

    def cast_router(self, dtype: str) -> Built:
        self.router[self.keys["weight"]] = self.router[self.keys["weight"]].astype(DTYPES[dtype])
        return self

    def read(self) -> MoEWeights:
        """The weights as the block holds them (dequantized), float64."""
        values = {}
        for part, prefix in (("routed", ""), ("shared", "shared_")):
            for role in ("gate", "up", "down"):
                values[prefix + DEEPSEEK[role]] = dense_weight(self.projection(part, role))
        bias = (to_numpy(self.router[self.keys["bias"]]) if "bias" in self.keys
                else np.zeros(self.setting.n_experts))
        table = np.array(self.router[self.keys["table"]]) if self.has_table else None
        return MoEWeights(gate=to_numpy(self.router[self.keys["weight"]]), bias=bias,
                          tid2eid=table, **values)

    # --- calls ---

    def _ids(self, fn, ids, shape):
        if not takes_ids(fn):
            return ()
        if ids is None:
            ids = np.zeros(shape, dtype=np.int32)
        return (mx.array(np.asarray(ids).reshape(shape), dtype=mx.int32),)

    def call_router(self, x: mx.array, ids=None):
        """The router's raw output for tokens x [T, D], called as the block
        calls it: on [1, T, D] (the [B, L, D] a model passes), or on [T, D]
        when the 3-D call fails (a router its block hands flattened tokens)."""
        last = None
        self.ran = True
        for shape in ((1,) + tuple(x.shape), tuple(x.shape)):
            try:
                xs = x.reshape(shape)
                out = self.router(xs, *self._ids(self.router.__call__, ids, shape[:-1]))
                split_route(out, "the router")
                mx.eval(out)
                return out
            except StructureError:
                raise
            except Exception as error:  # try the other layout before reporting
                last = error
        raise last

    def route(self, x: mx.array, ids=None) -> tuple[np.ndarray, np.ndarray]:
        """The router's (indices [T, k], weights [T, k]) for tokens x [T, D]."""
        indices, weights, _ = split_route(self.call_router(x, ids), "the router")
        k = indices.shape[-1]
        weights = to_numpy(weights.astype(mx.float32)).reshape(-1, k)
        if not self.variant.gate_applies_scale:
            weights = weights * self.setting.route_scale
        return np.array(indices).reshape(-1, k).astype(np.int64), weights

    def experts(self, x: mx.array, indices) -> mx.array:
        """Every chosen expert's unweighted output [T, k, D].  A routed-expert
        module that also takes the weights (and sums over k itself) is called
        once per slot with a one-hot weight."""
        idx = mx.array(np.asarray(indices), dtype=mx.int32)
        self.ran = True
        params = [p for p in call_parameters(self.routed.__call__)[2:] if p.default is p.empty]
        if not params:
            return self.routed(x, idx)
        k = idx.shape[-1]
        slots = []
        for slot in range(k):
            onehot = mx.array(np.tile(np.eye(k)[slot], idx.shape[:-1] + (1,)), dtype=mx.float32)
            slots.append(self.routed(x, idx, onehot).reshape(*x.shape[:-1], -1))
        return mx.stack(slots, axis=-2)

    def shared_out(self, x: mx.array) -> mx.array:
        self.ran = True
        return self.shared(x)

    def __call__(self, x: mx.array, ids=None) -> mx.array:
        """The block on x: [T, D] tokens go in as [1, T, D], the [B, L, D] a
        model passes (and come back as [T, D]); 3-D x goes in as it is."""
        flat = x.ndim == 2
        xs = x[None] if flat else x
        self.ran = True
        out = self.moe(xs, *self._ids(self.moe.__call__, ids, xs.shape[:-1]))
        if isinstance(out, (tuple, list)):  # some blocks also return an auxiliary value
            out = out[0]
        return out.reshape(x.shape[0], -1) if flat and out.size == x.size else out


def set_weight(layer, w: np.ndarray) -> None:
    """Store float64 ``w`` in a (quantized) projection; a quantized one takes
    its own format's round trip (the reference then reads that back)."""
    w32 = mx.array(np.asarray(w, np.float32))
    if is_quantized(layer):
        fmt = quant_format(layer)
        packed = mx.quantize(w32, fmt.group_size, fmt.bits, mode=fmt.mode)
        layer["weight"] = packed[0]
        layer["scales"] = packed[1].astype(layer["scales"].dtype)
        if len(packed) > 2 and layer.get("biases") is not None:
            layer["biases"] = packed[2].astype(layer["biases"].dtype)
    else:
        if tuple(layer["weight"].shape) != tuple(w32.shape):
            raise StructureError(f"weight of shape {tuple(layer['weight'].shape)} cannot take "
                                 f"{tuple(w32.shape)}")
        layer["weight"] = w32
    if "bias" in layer and layer["bias"] is not None:
        layer["bias"] = mx.zeros_like(layer["bias"]).astype(mx.float32)


# --- the variant ---------------------------------------------------------------------


class Variant:
    """A DeepSeek-V4-like model file, ready to build tiny MoE blocks from."""

    def __init__(self, spec, fresh: bool = False):
        self.spec = spec
        self.name = describe(spec)
        self.module = load_module(spec, fresh=fresh)
        self.fresh = fresh  # a private copy its caller may change: ranks cannot reload it
        self.properties: dict[str, object] = {}

    @functools.cached_property
    def args_cls(self):
        return find_args_class(self.module)

    @functools.cached_property
    def layout(self) -> Layout:
        return discover(self.module, self.args_cls)

    @property
    def model_type(self) -> str | None:
        """The ``model_type`` its ModelArgs defaults to: the config.json
        value that sends checkpoints to this file."""
        for f in dataclasses.fields(self.args_cls):
            if f.name == "model_type" and isinstance(f.default, str):
                return f.default
        return None

    def has_field(self, meaning: str) -> bool:
        return alias(self.args_cls, meaning) is not None

    @property
    def declares_hash_layers(self) -> bool:
        return self.has_field("hash_layers")

    def args(self, setting: Setting = Setting()):
        return make_args(self.args_cls, setting)

    def layer_index(self, setting: Setting) -> int:
        if setting.hash_layer or not self.declares_hash_layers:
            return 0
        return 1

    def build(self, setting: Setting = Setting(), weights: MoEWeights | None = None,
              quant: QuantFormat | None = None, shared_quant: QuantFormat | None = None,
              dtype: str = "float32") -> Built:
        """A tiny block holding ``weights`` (quantized and cast as asked)."""
        args = self.args(setting)
        moe = instantiate(self.layout.moe_cls, args, self.layer_index(setting))
        built = Built(self, setting, moe, args)
        if weights is not None:
            built.load(weights)
            built.quantize(quant, shared_quant)
            if dtype != "float32":
                built.cast(dtype)
        return built

    def wrap(self, moe, setting: Setting = Setting(), args=None) -> Built:
        """A block already built elsewhere (inside a whole Model)."""
        return Built(self, setting, moe, args)

    @functools.cached_property
    def gate_applies_scale(self) -> bool:
        """Whether the router's weights include route_scale (else the block
        multiplies them after it): their sums on random tokens say."""
        from dsv4shard.variants import data

        setting = Setting()
        built = self.build(setting)
        built_weights = data.weights(setting, seed=0)
        built.load(built_weights)
        x = data.tokens(16, seed=0)
        _, w, _ = split_route(built.call_router(x), "the router")
        sums = to_numpy(w.astype(mx.float32)).reshape(-1, setting.top_k).sum(-1)
        if np.allclose(sums, 1.0, rtol=1e-4) and setting.route_scale != 1.0:
            self.properties["route_scale"] = "applied by the block, after the router"
            return False
        return True

    def describe_layout(self) -> str:
        lay = self.layout
        built = self.build()
        order = self.gate_order(built)
        return (f"MoE class {lay.moe_cls.__name__}"
                f"{f' at layer.{lay.layer_attr}' if lay.layer_attr else ''}; router "
                f"{lay.path('router')} returns {order}; routed experts {lay.path('routed')} "
                f"({type(built.routed).__name__}); shared expert {lay.path('shared')}; "
                f"called as {signature_text(built.moe.__call__)}")

    def gate_order(self, built: Built) -> str:
        from dsv4shard.variants import data

        built.load(data.weights(built.setting, seed=0))
        x = data.tokens(2, seed=0)
        return split_route(built.call_router(x), "the router")[2]
