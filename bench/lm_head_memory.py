"""Peak memory of one GGN (and Fisher, EF, Hessian) product on a 50k-vocabulary LM head vs a plain
forward/backward (issue 20 item 5: at most O(B·T·V) materialised once; goal within 3x).

    python bench/lm_head_memory.py [--vocab 50257] [--batch 8] [--seq 32] [--width 64] [--out FILE]

A GPT-like LM (token + position embeddings, one pre-LayerNorm attention block, final LayerNorm, an
untied ``width x vocab`` head), float32, CPU, random token ids, ``--loss lm``.  Each operation runs
in its own subprocess after the model, data and objective are built; ``alloc_peak`` is the peak of
torch's allocator above its level before the operation (CPU: :mod:`torch.profiler` memory events),
``logits`` the bytes of one ``[B, T, V]`` float32 tensor, ``ratio`` = alloc_peak / the plain
forward/backward's.  Operations:

- ``grad``: ``autograd.grad`` of the mean next-token loss (``Objective.grad_flat``) — the baseline;
- ``ggn``: one GGN product, closed-form output Hessian (``diag(p) − p pᵀ`` per token, in place);
- ``ggn-autograd``: the same product with the output Hessian by double backward in output space
  (what ``--loss lm`` used before the closed form);
- ``fisher``: one MC Fisher product (1 draw); ``ef``: one empirical-Fisher product (output-space form);
- ``hessian``: one Hessian-vector product (double backward).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, write_results  # noqa: E402

OPS = ("grad", "ggn", "ggn-autograd", "fisher", "ef", "hessian")


def build(spec: dict):
    import torch
    import torch.nn.functional as F
    from torch import nn

    V, T, D = spec["vocab"], spec["seq"], spec["width"]

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(V, D), nn.Embedding(T, D)
            self.ln1, self.lnf = nn.LayerNorm(D), nn.LayerNorm(D)
            self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
            self.head = nn.Linear(D, V, bias=False)

        def forward(self, input_ids):
            B, L = input_ids.shape
            h = self.wte(input_ids) + self.wpe(torch.arange(L))
            q, k, v = self.qkv(self.ln1(h)).reshape(B, L, 3, 4, D // 4).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + self.proj(a.transpose(1, 2).reshape(B, L, D))
            return self.head(self.lnf(h))

    torch.manual_seed(0)
    ids = torch.randint(0, V, (spec["batch"], T), generator=torch.Generator().manual_seed(1))
    return LM(), ids


def child(spec: dict) -> dict:
    import torch

    from sam_probe.core.memory import peak_bytes
    from sam_probe.core.objective import Objective
    from sam_probe.core.operators import curvature_operator

    model, ids = build(spec)
    obj = Objective(model, ids, None, "lm")
    obj.denominator  # noqa: B018 - counted before the measurement
    v = torch.randn(obj.n_params, 1, generator=torch.Generator().manual_seed(2))
    op = spec["op"]
    if op == "grad":
        fn = obj.grad_flat
    elif op == "hessian":
        fn = lambda: obj.hvp_block(v)  # noqa: E731
    else:
        kw = {"ggn": {}, "ggn-autograd": {"closed_form": False}, "fisher": {"mc_samples": 1},
              "ef": {"per_sample": False}}[op]
        name = "ggn" if op.startswith("ggn") else op
        A = curvature_operator(obj, name, **kw)
        fn = lambda: A.matmat(v)  # noqa: E731
    fn()  # warm-up (torch.func transforms, allocator)
    t0 = time.perf_counter()
    peak = peak_bytes(fn, "cpu")
    return {"op": op, "alloc_peak": peak, "seconds": time.perf_counter() - t0, "n_params": obj.n_params}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "lm_head_memory.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return {}
    spec = {"vocab": a.vocab, "batch": a.batch, "seq": a.seq, "width": a.width}
    t_start = time.perf_counter()
    rows = []
    for op in a.ops.split(","):
        p = subprocess.run([sys.executable, __file__, "--child", json.dumps({**spec, "op": op})],
                           capture_output=True, text=True, check=True)
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    logits = a.batch * a.seq * a.vocab * 4
    base = next((r["alloc_peak"] for r in rows if r["op"] == "grad"), None)
    for r in rows:
        r["logits_multiple"] = r["alloc_peak"] / logits
        r["ratio"] = r["alloc_peak"] / base if base else None
    res = {"spec": spec, "logits_bytes": logits, "rows": rows, "environment": environment(),
           "goal": "ggn alloc_peak <= 3x grad"}
    write_results(a.out, res, time.perf_counter() - t_start)
    return res


if __name__ == "__main__":
    main()
