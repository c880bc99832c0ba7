"""How long the float64 reference takes for one MoE block.

    python benchmarks/reference_moe.py [--tokens 64 --experts 64 --top-k 6 --hidden 256 --intermediate 512]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import reference as ref


def random_weights(config, rng):
    d, i, e = config.hidden_size, config.intermediate_size, config.n_experts
    return ref.MoEWeights(
        gate=rng.normal(0, d**-0.5, (e, d)), bias=rng.normal(0, 0.1, e),
        w1=rng.normal(0, d**-0.5, (e, i, d)), w3=rng.normal(0, d**-0.5, (e, i, d)),
        w2=rng.normal(0, i**-0.5, (e, d, i)),
        shared_w1=rng.normal(0, d**-0.5, (i, d)), shared_w3=rng.normal(0, d**-0.5, (i, d)),
        shared_w2=rng.normal(0, i**-0.5, (d, i)),
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args(argv)
    config = ref.MoEConfig(a.hidden, a.intermediate, a.experts, a.top_k)
    rng = np.random.default_rng(0)
    weights = random_weights(config, rng)
    x = rng.normal(0, 1, (a.tokens, a.hidden))
    ref.moe(x, weights, config)  # warm-up
    times = []
    for _ in range(a.repeats):
        start = time.perf_counter()
        ref.moe(x, weights, config)
        times.append(time.perf_counter() - start)
    print(f"reference.moe T={a.tokens} E={a.experts} k={a.top_k} D={a.hidden} "
          f"I={a.intermediate}: median {statistics.median(times) * 1e3:.2f} ms, "
          f"min {min(times) * 1e3:.2f} ms over {a.repeats} runs")


if __name__ == "__main__":
    main()
