"""Overlap benchmark: 100 checkpoints x 11M parameters of synthetic stored category codes.

    python bench/overlap.py [--steps 100] [--params 11000000] [--repeats 3]

Data (seeded): per checkpoint, category codes from a Markov chain (each parameter
keeps its code with probability 0.8, else redraws it from the category mix measured on
the digits MLP by bench/ratios.py: C1 63.7%, C2 33.6%, C3 0.9%, C4 0.8%, boundary 0.01%,
undefined 0.99%), packed with :mod:`sam_probe.core.bitpack` and written with h5py to a
temporary folder the way the store writes arrays (gzip + shuffle for arrays of more than
4096 entries), plus a synthetic IRE flat mask (1 bit, 10% of the parameters) per file.

Timed (medians of ``repeats`` fresh processes; files are in the page cache): read every
file, build the C1 membership masks (1 bit per parameter), and run ``overlap_analysis``
with the pairwise Jaccard matrix (4,950 pairs), anchor overlap, persistent core and the
IRE link (flat masks streamed from the files).  Memory: peak RSS growth of the analysis
process after its imports, and the tracemalloc peak (numpy buffers) of one extra run,
in bits per parameter per checkpoint.  Goal (issue 5): < 60 s and <= 2 bits per parameter
per checkpoint in memory and on disk.  Writes bench/results/overlap.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import environment, write_results  # noqa: E402

MIX = np.array([0.637, 0.336, 0.009, 0.008, 0.0001, 0.0099])
KEEP = 0.8
FLAT_FRACTION = 0.1
GOAL_SECONDS = 60.0
GOAL_BITS = 2.0


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


# ------------------------------------------------------------------- data
def generate(folder: Path, steps: int, n: int, seed: int) -> dict:
    """Write ``steps`` files of packed codes + flat mask; return sizes on disk."""
    import h5py

    from sam_probe.core import bitpack

    rng = np.random.default_rng(seed)
    cdf = np.cumsum(MIX)
    cdf /= cdf[-1]
    codes = np.searchsorted(cdf, rng.random(n, dtype=np.float32), side="right").astype(np.uint8)
    disk = {"codes": 0, "flat": 0, "files": 0}
    raw_bits = []
    for t in range(steps):
        if t:
            idx = np.flatnonzero(rng.random(n, dtype=np.float32) >= KEEP)
            codes[idx] = np.searchsorted(cdf, rng.random(idx.size, dtype=np.float32), side="right")
        packed = bitpack.pack_codes(codes)
        raw_bits.append(bitpack.bits_per_param(packed))
        flat = np.packbits(rng.random(n, dtype=np.float32) < FLAT_FRACTION)
        path = folder / f"step_{t:04d}.h5"
        with h5py.File(path, "w") as f:
            g = f.create_group("codes")
            for k, v in packed.items():
                if isinstance(v, np.ndarray):
                    big = v.size > 4096
                    g.create_dataset(k, data=v, compression="gzip" if big else None, shuffle=big)
                else:
                    g.attrs[k] = v
            f.create_dataset("ire_flat", data=flat, compression="gzip", shuffle=True)
            disk["codes"] += sum(g[k].id.get_storage_size() for k in g)
            disk["flat"] += f["ire_flat"].id.get_storage_size()
        disk["files"] += path.stat().st_size
    disk["raw_codes_bits_per_param"] = float(np.mean(raw_bits))
    return disk


def read_codes(path: Path) -> dict:
    import h5py

    with h5py.File(path, "r") as f:
        g = f["codes"]
        out = {k: g[k][()] for k in g}
        out.update({k: int(v) for k, v in g.attrs.items()})
    return out


def read_flat(path: Path) -> np.ndarray:
    import h5py

    with h5py.File(path, "r") as f:
        return f["ire_flat"][()]


# --------------------------------------------------------------- analysis
def analyse(folder: Path, trace: bool) -> dict:
    """One timed analysis (run in a fresh process)."""
    import tracemalloc

    import h5py  # noqa: F401  (imported before the baseline RSS)

    from sam_probe.core import bitpack
    from sam_probe.core.overlap import overlap_analysis

    files = sorted(folder.glob("step_*.h5"))
    rss0 = _rss_kib("VmRSS")
    if trace:
        tracemalloc.start()
    t0 = time.perf_counter()
    masks = []
    n = 0
    for p in files:
        packed = read_codes(p)
        n = int(packed["n"])
        masks.append(bitpack.membership_mask(packed, "C1"))
        del packed
    t_load = time.perf_counter() - t0
    res = overlap_analysis(masks, n, steps=list(range(len(files))), category="C1",
                           flat_masks=(read_flat(p) for p in files), ire_rank=1 - FLAT_FRACTION)
    total = time.perf_counter() - t0
    peak_traced = tracemalloc.get_traced_memory()[1] if trace else None
    d = res.to_dict()
    return {"seconds": total, "seconds_load": t_load, "rss_growth_bytes": 1024 * (_rss_kib("VmHWM") - rss0),
            "traced_peak_bytes": peak_traced, "n": n, "steps": len(files),
            "summary": {"C1_fraction_first": d["fractions"][0],
                        "anchor_lift_last": d["anchor"]["lift"][-1],
                        "persistent_size_last": d["persistent"]["size"][-1],
                        "persistent_size_10": d["persistent"]["size"][min(10, len(files) - 1)],
                        "jaccard_0_1": d["jaccard"][0][1] if len(files) > 1 else None,
                        "ire_lift_first": d["ire"]["lift"][0]}}


def run_child(folder: Path, trace: bool) -> dict:
    cmd = [sys.executable, __file__, "--analyse", str(folder)] + (["--trace"] if trace else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--params", type=int, default=11_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "overlap.json"))
    ap.add_argument("--analyse", help=argparse.SUPPRESS)
    ap.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.analyse:
        print(json.dumps(analyse(Path(a.analyse), a.trace)))
        return 0

    t_start = time.perf_counter()
    T, n = a.steps, a.params
    with tempfile.TemporaryDirectory(prefix="sam-probe-overlap-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        disk = generate(folder, T, n, a.seed)
        t_gen = time.perf_counter() - t0
        runs = [run_child(folder, trace=False) for _ in range(a.repeats)]
        traced = run_child(folder, trace=True)
    sec = statistics.median(r["seconds"] for r in runs)
    load = statistics.median(r["seconds_load"] for r in runs)
    rss = max(r["rss_growth_bytes"] for r in runs)
    bits = lambda b: 8.0 * b / (n * T)  # noqa: E731
    out = {
        "environment": environment(numpy=np.__version__, bitwise_count=hasattr(np, "bitwise_count"),
                                   repeats=a.repeats),
        "steps": T, "n_params": n, "category_mix": MIX.tolist(), "keep_probability": KEEP,
        "seconds_generate_and_write": t_gen,
        "seconds_median": sec, "seconds_load_median": load, "seconds_all": [r["seconds"] for r in runs],
        "memory_bits_per_param_rss": bits(rss), "memory_bits_per_param_traced": bits(traced["traced_peak_bytes"]),
        "disk_bits_per_param_codes": bits(disk["codes"]), "disk_bits_per_param_flat_mask": bits(disk["flat"]),
        "disk_bits_per_param_files": bits(disk["files"]),
        "raw_bits_per_param_codes": disk["raw_codes_bits_per_param"],
        "summary": runs[0]["summary"],
        "goal": {"seconds": GOAL_SECONDS, "bits": GOAL_BITS},
    }
    out["pass"] = bool(sec < GOAL_SECONDS and out["memory_bits_per_param_rss"] <= GOAL_BITS
                       and out["disk_bits_per_param_codes"] <= GOAL_BITS)
    print(f"overlap of {T} checkpoints x {n:,} parameters (C1, pairwise Jaccard, anchor, persistent core, IRE)")
    rows = [
        ("generate + write (not timed goal)", f"{t_gen:.1f} s"),
        (f"analysis, median of {a.repeats}", f"{sec:.1f} s (read + masks {load:.1f} s)"),
        ("memory: peak RSS growth", f"{out['memory_bits_per_param_rss']:.3f} bits/param/ckpt"),
        ("memory: tracemalloc peak", f"{out['memory_bits_per_param_traced']:.3f} bits/param/ckpt"),
        ("codes in memory (arrays)", f"{out['raw_bits_per_param_codes']:.3f} bits/param/ckpt"),
        ("disk: codes (gzip+shuffle)", f"{out['disk_bits_per_param_codes']:.3f} bits/param/ckpt"),
        ("disk: IRE flat mask", f"{out['disk_bits_per_param_flat_mask']:.3f} bits/param/ckpt"),
        ("disk: whole files", f"{out['disk_bits_per_param_files']:.3f} bits/param/ckpt"),
    ]
    for k, v in rows:
        print(f"  {k:<36} {v}")
    print(f"  goal < {GOAL_SECONDS:.0f} s and <= {GOAL_BITS:.0f} bits/param/ckpt: {'PASS' if out['pass'] else 'FAIL'}")
    write_results(a.out, out, time.perf_counter() - t_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
