"""Peak memory of streamed vs in-memory data as the selection grows.

    python bench/streaming.py [--sizes 2048,8192,32768] [--out bench/results/streaming.json]

A ``Dataset`` whose items (3x32x32 float32 images, 10 classes) are generated
from their index on access, so nothing but the model exists until a chunk is
read.  For each N, one fresh subprocess per mode measures the peak resident set
size (``resource.getrusage`` maxrss) of building the objective through the
pipeline's data path and running one loss, one gradient and two HVPs at
``--batch-size 256``:

- ``streamed``: the Dataset is handed over as it is (chunks collated on demand);
- ``in-memory``: the same items stacked into one tensor first (the reference).

The ratio ``rss(N_max) / rss(N_min)`` is printed per mode: ~1 for streamed data
(O(batch) memory), growing with N for the in-memory reference.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHILD = r"""
import json, resource, sys, torch
from torch import nn
sys.path.insert(0, {root!r})
from sam_probe.core.objective import Objective
from sam_probe.loading.data import streamed, from_tensors
torch.set_num_threads(1)
N, mode = {n}, {mode!r}

class Images(torch.utils.data.Dataset):
    def __len__(self): return N
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, 32, 32, generator=g), i % 10

torch.manual_seed(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(3072, 16), nn.Tanh(), nn.Linear(16, 10))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if mode == "streamed":
    sel = streamed(Images(), "images")
else:
    ds = Images()
    sel = from_tensors(torch.stack([ds[i][0] for i in range(N)]), torch.tensor([ds[i][1] for i in range(N)]), "images")
obj = Objective(model, sel.batches(), None, "ce", chunk_size=256)
loss = obj.loss()
g = obj.grad_flat()
obj.hvp_block(torch.randn(obj.n_params, 2))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"rss_peak_mib": peak / 1024, "rss_above_model_mib": (peak - base) / 1024, "loss": loss}}))
"""


def measure(n: int, mode: str) -> dict:
    root = str(Path(__file__).resolve().parents[1])
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=root, n=n, mode=mode)], capture_output=True,
                         text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["seconds"] = time.perf_counter() - t0
    return res


def main() -> None:
    from bench.common import environment, write_results

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2048,8192,32768")
    ap.add_argument("--out", default="bench/results/streaming.json")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    t0 = time.perf_counter()
    rows = []
    for n in sizes:
        for mode in ("streamed", "in-memory"):
            r = measure(n, mode)
            rows.append({"n": n, "mode": mode, **r})
            print(f"N={n:6d} {mode:9s} peak RSS {r['rss_peak_mib']:8.1f} MiB (above model {r['rss_above_model_mib']:7.1f})"
                  f"  loss {r['loss']:.6f}  {r['seconds']:.1f} s")
    summary = {}
    for mode in ("streamed", "in-memory"):
        mine = [r for r in rows if r["mode"] == mode]
        summary[mode] = {"rss_ratio_largest_to_smallest": mine[-1]["rss_peak_mib"] / mine[0]["rss_peak_mib"]}
        print(f"{mode}: peak RSS at N={sizes[-1]} / N={sizes[0]} = {summary[mode]['rss_ratio_largest_to_smallest']:.2f}")
    same = all(abs(a["loss"] - b["loss"]) < 1e-5 for a, b in zip(rows[0::2], rows[1::2]))
    print(f"streamed and in-memory losses agree: {same}")
    write_results(a.out, {"environment": environment(resource_note="ru_maxrss of a fresh subprocess"),
                          "batch_size": 256, "rows": rows, "summary": summary, "losses_agree": same},
                  time.perf_counter() - t0)


if __name__ == "__main__":
    main()
