"""Memory and time per rank of a model-sharded Hessian product (``--shard-model``) for R = 1, 2, 4.

    python bench/sharded.py [--layers 12] [--width 768] [--ranks 1 2 4] [--products 2] [--out FILE]

A GPT-2-style LM built from ``GPT2Config`` (default: GPT-2 small, 124M parameters, float32, random
init, 4 sequences of 32 tokens, ``--loss lm``) is saved once as a Hugging Face folder (one
safetensors file); then R gloo ranks on this host (each a process with torchrun's environment) do
what ``--shard-model`` does: read the folder memory-mapped, build the model with meta-device
parameters, shard it with FSDP2 and fill each rank's rows (:mod:`sam_probe.core.meta_init`), then
:class:`sam_probe.core.sharded.ShardedObjective`.  Per rank:

- ``shard_entries``: this rank's parameter entries ``P_r`` (``≈ P / R``);
- ``tensor_bytes``: the parameter, saved-shard and solver-vector bytes this rank holds for a top-1
  Lanczos solve, ``(3 + peak solver vectors) · P_r · 4`` (counted, not RSS);
- ``rss_start_mb`` / ``rss_built_mb`` / ``rss_peak_mb``: resident memory after imports, after the
  sharded objective is built, and the process's peak (products and solve included; the pages of the
  memory-mapped weights a rank touched count here, a rank touches its own rows);
- ``seconds_per_hvp``: median wall time of ``--products`` products (four gradients each).

The ratio ``tensor_bytes(R) / tensor_bytes(1)`` is the measured 1/R; times on a shared 2-core CPU are
indicative only (all ranks share the cores).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args: argparse.Namespace, out: Path) -> None:
    import torch

    from sam_probe import distributed
    from sam_probe.core.lanczos import top_eigen
    from sam_probe.core.meta_init import materialise_shards, params_on_meta
    from sam_probe.core.sharded import ShardedObjective, fully_shard_model
    from sam_probe.core.vectors import VectorCount
    from sam_probe.loading.checkpoints import load_checkpoint

    distributed.init("cpu")
    import torch.distributed as dist
    from transformers import GPT2Config, GPT2LMHeadModel

    rss_start = rss_now_mb()
    ck = load_checkpoint(args.weights)  # the folder's safetensors, memory-mapped (verified, hashed)
    cfg = GPT2Config.from_pretrained(args.weights)
    t0 = time.perf_counter()
    with params_on_meta():  # what --shard-model does (pipeline/build.py): no whole model on any rank
        model = GPT2LMHeadModel._from_config(cfg, attn_implementation="eager").eval()
    fully_shard_model(model, device="cpu")
    materialise_shards(model, ck.state, {}, "cpu", dist.get_world_size(), dist.get_rank())
    ids = torch.randint(0, cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    obj = ShardedObjective(model, ids, None, "lm", copy=False)
    build = time.perf_counter() - t0
    rss_built = rss_now_mb()
    op = obj.hessian()
    v = obj.grad()
    times = []
    for _ in range(args.products):
        t = time.perf_counter()
        op.matmat(v[:, None])
        times.append(time.perf_counter() - t)
    count = VectorCount()
    eig = top_eigen(op, 1, tol=1e-1, max_hvp=3 + args.products, count=count)  # a few products: the vectors held
    res = {"rank": obj.rank, "world": obj.world, "P": obj.n_params, "shard_entries": obj.space.size,
           "peak_solver_vectors": count.peak, "tensor_bytes": int((3 + count.peak) * obj.space.size * 4),
           "seconds_per_hvp": statistics.median(times), "seconds_build": build,
           "rss_start_mb": rss_start, "rss_built_mb": rss_built,
           "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "lambda_estimate": eig.eigenvalues[0]}
    out.joinpath(f"rank{obj.rank}.json").write_text(json.dumps(res))
    distributed.shutdown()


def run(world: int, args: argparse.Namespace, tmp: Path) -> list[dict]:
    from sam_probe import distributed

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(distributed.free_port()),
           "WORLD_SIZE": str(world), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world))}
    argv = [sys.executable, __file__, "--worker", str(tmp), "--weights", str(args.weights), "--products",
            str(args.products)]
    procs = [subprocess.Popen(argv, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(world)]
    for p in procs:
        if p.wait(timeout=args.timeout) != 0:
            raise SystemExit(f"R={world}: a rank failed")
    return [json.loads(tmp.joinpath(f"rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--products", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sharded.json"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args, Path(args.worker))
        return
    import tempfile

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    weights = tempfile.TemporaryDirectory()
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=max(1, args.width // 64), n_positions=64)
    GPT2LMHeadModel(cfg).eval().save_pretrained(weights.name)  # one safetensors file, read per rank
    args.weights = weights.name

    from common import environment, write_results

    t0 = time.perf_counter()
    rows = {}
    for R in args.ranks:
        with tempfile.TemporaryDirectory() as tmp:
            ranks = run(R, args, Path(tmp))
        worst = max(ranks, key=lambda r: r["tensor_bytes"])
        rows[str(R)] = {"ranks": ranks, "tensor_bytes_max": worst["tensor_bytes"],
                        "rss_peak_mb_max": max(r["rss_peak_mb"] for r in ranks),
                        "rss_built_mb_max": max(r["rss_built_mb"] for r in ranks),
                        "seconds_per_hvp": max(r["seconds_per_hvp"] for r in ranks)}
        print(f"R={R}: P={worst['P']:,} shard {worst['shard_entries']:,} tensors {worst['tensor_bytes'] / 2**20:.0f} MiB "
              f"RSS peak {rows[str(R)]['rss_peak_mb_max']:.0f} MiB, {rows[str(R)]['seconds_per_hvp']:.1f} s/HVP",
              flush=True)
    base = rows[str(min(args.ranks))]["tensor_bytes_max"]
    for row in rows.values():
        row["tensor_ratio"] = row["tensor_bytes_max"] / base
        row["rss_ratio"] = row["rss_peak_mb_max"] / rows[str(min(args.ranks))]["rss_peak_mb_max"]
    write_results(args.out, {"environment": environment(load=os.getloadavg()), "layers": args.layers,
                             "width": args.width, "rows": rows}, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
