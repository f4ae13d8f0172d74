"""Lean solvers: products and peak memory of the certified top-k solve, lean vs planned.

    python bench/solvers.py [--quick]        # writes bench/results/solvers.json

For the digits MLP run (``sample_runs/digits-mlp-sgd``, 8,970 parameters, every checkpoint,
cold and warm-started) and a GPT-2-config causal LM (``transformers.GPT2Config``, a few
million parameters, 8 sequences of 32 tokens, float32): top-5 at ``--tol 1e-3`` with

- ``lean``: the default (no ``--max-memory``): at most ``k + c`` vectors, the certificate's
  ``k`` explicit products, the fresh-block order check;
- ``planned``: a memory plan with room (a 20-row basis and its products: no certificate
  products), same order check;
- ``no-check``: the planned solve without the order check (what the solver certified before
  issue 20: residuals only).

Reported per variant: products (``n_hvp``, the certificate's ``n_certify`` and the order check's
share), the solver's own peak vector count, and the peak bytes torch allocated during the
solve (allocator events, so activations of the products are included) in parameter-sized
vectors.  Run the same script with ``PYTHONPATH`` pointing at an older checkout to get its
numbers (only ``n_hvp`` and the peak bytes exist there).  Products are deterministic (seeded):
one pass; no timings.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import environment, write_results  # noqa: E402
from sam_probe.core.lanczos import top_eigen  # noqa: E402
from sam_probe.core.memory import peak_bytes  # noqa: E402
from sam_probe.core.objective import Objective  # noqa: E402

K, TOL = 5, 1e-3
LEAN = hasattr(__import__("sam_probe.core.lanczos", fromlist=["x"]), "default_basis")


def variants() -> dict:
    if not LEAN:
        return {"before (44-vector basis)": {}}
    return {"lean": {}, "planned": {"max_vectors": 64}, "no-check": {"max_vectors": 64, "check": False}}


def solve(obj, warm=None, **kw) -> dict:
    out = {}
    if LEAN:
        from sam_probe.core.vectors import VectorCount

        kw["count"] = VectorCount()
    peak = peak_bytes(lambda: out.setdefault("r", top_eigen(obj, K, tol=TOL, warm=warm, **kw)), obj.device)
    r = out["r"]
    vec = obj.n_params * torch.empty((), dtype=obj.dtype).element_size()
    row = {"n_hvp": r.n_hvp, "eigenvalues": r.eigenvalues, "converged": r.all_converged,
           "peak_torch_vectors": round(peak / vec, 2)}
    if LEAN:
        row.update(n_certify=r.n_certify, n_checks=r.n_checks, n_missed=r.n_missed, order_checked=r.order_checked,
                   solver_peak_vectors=kw["count"].peak, basis_vectors=r.plan["basis_vectors"],
                   keep_products=r.plan["keep_products"])
    return row, r


def digits_run(quick: bool) -> dict:
    import sam_probe as sp

    cks = sorted((ROOT / "sample_runs" / "digits-mlp-sgd").glob("*.pt"))
    if quick:
        cks = cks[:4]
    objs = [sp.objective(str(c)) for c in cks]
    out = {"n_params": objs[0].n_params, "checkpoints": len(cks), "variants": {}}
    for name, kw in variants().items():
        cold, warm, peaks, spk = [], [], [], []
        prev = None
        for obj in objs:
            c, _ = solve(obj, **kw)
            w, rw = solve(obj, warm=prev, **kw)
            prev = rw.eigenvectors
            cold.append(c["n_hvp"])
            warm.append(w["n_hvp"])
            peaks.append(max(c["peak_torch_vectors"], w["peak_torch_vectors"]))
            spk.append(c.get("solver_peak_vectors"))
        out["variants"][name] = {"cold_n_hvp": cold, "warm_n_hvp": warm, "cold_total": sum(cold),
                                 "warm_total": sum(warm), "peak_torch_vectors": max(peaks),
                                 "solver_peak_vectors": max(spk) if spk[0] is not None else None}
        print(f"digits {name}: cold {sum(cold)} warm {sum(warm)} peak {max(peaks)} vectors", flush=True)
    return out


class LM(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids).logits


def gpt(quick: bool) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    d, layers, vocab = (128, 2, 1024) if quick else (256, 4, 2048)
    cfg = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=d, n_layer=layers, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    model = GPT2LMHeadModel._from_config(cfg, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (8, 32), generator=g)
    obj = Objective(LM(model), ids, None, "lm", dtype=torch.float32)
    out = {"n_params": obj.n_params, "config": {"n_embd": d, "n_layer": layers, "vocab": vocab}, "variants": {}}
    for name, kw in variants().items():
        row, _ = solve(obj, **kw)
        out["variants"][name] = row
        print(f"gpt {obj.n_params} params {name}: {row}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="4 checkpoints and a smaller LM")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "solvers.json")
    args = ap.parse_args()
    t0 = time.time()
    res = {"environment": environment(k=K, tol=TOL, lean=LEAN), "digits_mlp": digits_run(args.quick),
           "gpt": gpt(args.quick)}
    write_results(args.out, res, time.time() - t0)


if __name__ == "__main__":
    main()
