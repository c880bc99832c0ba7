"""Where ranks run and how they meet: mlx.launch's hostfile format.

A hostfile is JSON: either a list of hosts or ``{"backend": ..., "envs":
[...], "hosts": [...]}``; each host is ``{"ssh": name, "ips": [...],
"rdma": [...]}``.  The backend comes from the file: ``jaccl`` for Macs over
Thunderbolt RDMA, ``ring`` over TCP, ``nccl`` for the GPUs of one host.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field

BACKENDS = ("ring", "jaccl", "nccl")
LOCAL_NAMES = ("localhost", "127.0.0.1", "")


class HostfileError(ValueError):
    """The hostfile cannot describe a group of ranks."""


@dataclass(frozen=True)
class Host:
    ssh: str
    ips: tuple[str, ...] = ()
    rdma: tuple = ()
    env: tuple[tuple[str, str], ...] = ()  # this host's own variables ("env": {...})

    @property
    def is_local(self) -> bool:
        return self.ssh in LOCAL_NAMES or self.ssh == socket.gethostname()


@dataclass(frozen=True)
class Hostfile:
    hosts: tuple[Host, ...]
    backend: str
    envs: tuple[str, ...] = field(default=())


def free_port() -> int:
    """A port nothing listens on now (the OS picks it), so concurrent pools
    (xdist workers) never collide."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local(size: int, backend: str = "ring") -> Hostfile:
    """``size`` ranks on this host."""
    if size < 2:
        raise HostfileError(f"a multi-rank group needs at least 2 ranks, got {size}")
    if backend not in ("ring", "nccl"):
        raise HostfileError(f"backend {backend!r} cannot run all ranks on one host here")
    return Hostfile(tuple(Host("localhost", ("127.0.0.1",)) for _ in range(size)), backend)


def load(path: str, backend: str | None = None) -> Hostfile:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise HostfileError(f"cannot read hostfile {path}: {error}") from error
    envs: list[str] = []
    if isinstance(data, dict):
        backend = backend or data.get("backend")
        envs = list(data.get("envs", []))
        data = data.get("hosts")
    if not isinstance(data, list) or len(data) < 2:
        raise HostfileError(f"hostfile {path} must list at least 2 hosts")
    hosts = []
    for i, h in enumerate(data):
        if isinstance(h, str):
            h = {"ssh": h, "ips": [h]}
        if not isinstance(h, dict) or "ssh" not in h:
            raise HostfileError(f"hostfile {path}: host {i} has no 'ssh' name: {h!r}")
        env = h.get("env", {})
        if not isinstance(env, dict):
            raise HostfileError(f"hostfile {path}: host {i}'s 'env' must map names to values")
        hosts.append(Host(h["ssh"], tuple(h.get("ips", [])), tuple(h.get("rdma", [])),
                          tuple((str(k), str(v)) for k, v in env.items())))
    backend = backend or ("jaccl" if any(h.rdma for h in hosts) else "ring")
    if backend not in BACKENDS:
        raise HostfileError(f"hostfile {path}: backend {backend!r} is not one of {BACKENDS}")
    if backend in ("ring", "jaccl", "nccl") and not hosts[0].ips:
        raise HostfileError(f"hostfile {path}: rank 0 ({hosts[0].ssh}) needs an IP")
    if backend == "jaccl" and any(len(h.rdma) != len(hosts) for h in hosts):
        raise HostfileError(f"hostfile {path}: jaccl needs one RDMA entry per host on "
                            "every host (null for itself)")
    return Hostfile(tuple(hosts), backend, tuple(envs))


def rank_environments(hostfile: Hostfile) -> list[dict[str, str]]:
    """Per rank, the variables mx.distributed.init reads for the backend, and
    files (name -> content) to write on that rank's host."""
    n = len(hostfile.hosts)
    common = dict(e.split("=", 1) for e in hostfile.envs)
    out = []
    if hostfile.backend == "ring":
        ring = [[f"{h.ips[0] if h.ips else '127.0.0.1'}:{free_port()}"] for h in hostfile.hosts]
        for r in range(n):
            out.append({**common, "MLX_RANK": str(r), "@MLX_HOSTFILE": json.dumps(ring)})
    elif hostfile.backend == "nccl":
        port = free_port()
        local_ranks = all(h.is_local for h in hostfile.hosts)
        for r in range(n):
            env = {**common, "MLX_RANK": str(r), "MLX_WORLD_SIZE": str(n),
                   "NCCL_HOST_IP": hostfile.hosts[0].ips[0], "NCCL_PORT": str(port)}
            if local_ranks:  # one GPU per rank on this host
                env["CUDA_VISIBLE_DEVICES"] = str(r)
            out.append(env)
    else:  # jaccl
        coordinator = f"{hostfile.hosts[0].ips[0]}:{free_port()}"
        devices = json.dumps([list(h.rdma) for h in hostfile.hosts])
        for r in range(n):
            out.append({**common, "MLX_RANK": str(r), "MLX_JACCL_COORDINATOR": coordinator,
                        "@MLX_IBV_DEVICES": devices})
    return [{**env, **dict(host.env)} for env, host in zip(out, hostfile.hosts)]
