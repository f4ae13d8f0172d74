"""Loading benchmark: pre-scan cost per MB, time to refuse each bomb, overhead on a large legit checkpoint.

    python bench/loading.py [--repeats 5] [--big-mb 512] [--old-rev af3bddd]

1. Pre-scan of one pickle, per MB, for four shapes (a real checkpoint's data.pkl
   with Adam state, a list of floats, strings, one-byte opcodes): the previous
   pre-scan (``pickletools.genops``, ``globals_in_pickle``) and the new one
   (``scan_pickle``) timed interleaved in this process, medians and their ratio;
   torch's own restricted unpickling of the same bytes as the yardstick.
2. Time from ``load_checkpoint`` to its one-line ``CheckpointError`` for each
   bomb of issue 12 (zip bomb 300 MB, memo bomb 40 KB, 200k-deep nesting,
   (2^20, 2^20) stride-0 tensor, 4M opcodes, colliding integers), in this
   process (median); and the previous loader on the same files in a child
   process with a 30 s limit (loaded from git revision ``--old-rev``).
3. A legit checkpoint of ``--big-mb`` MB of float32 weights: ``load_checkpoint``
   (layout + restricted unpickling + the one pass that checks every CRC-32,
   hashes the file and scans for NaN/Inf) against
   ``torch.load(mmap=True, weights_only=True)`` followed by one pass over every
   tensor (what any analysis does next), interleaved, medians; a first read
   (nothing remembered about the file).
4. What an analysis does with that checkpoint before and while using it (the
   pipeline's sequence): load + NaN/Inf scan while ordering the run, the sha256
   for the unit key, load + scan again for the computation (a large file is not
   kept between the two), then one read of every weight; this revision in this
   process against the previous revision (``--old-rev``, the whole package from
   git, in a child process) and against ``torch.load(mmap=True)`` + one read of
   every weight; passes over the file counted (``sam_probe.loading.verify``).

Writes bench/results/loading.json.
"""
from __future__ import annotations

import argparse
import io
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import environment, write_results  # noqa: E402

from sam_probe.errors import CheckpointError  # noqa: E402
from sam_probe.loading.checkpoints import load_checkpoint  # noqa: E402
from sam_probe.loading.pickle_scan import scan_pickle  # noqa: E402
from sam_probe.loading.safe_pickle import globals_in_pickle  # noqa: E402 - the previous pre-scan, unchanged


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _data_pkl(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        return zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))


def pickles() -> dict[str, bytes]:
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(500)])
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 8)).sum().backward()
    opt.step()
    return {
        "checkpoint (1000 tensors + Adam state)": _data_pkl({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                                             "step": 10}),
        "list of 200k floats": pickle.dumps([i * 0.5 for i in range(200_000)], protocol=2),
        "100k short strings": pickle.dumps([f"name_{i}" for i in range(100_000)], protocol=2),
        "1M one-byte opcodes": b"\x80\x02](" + b"N" * 1_000_000 + b"e.",
    }


def _torch_unpickle(data: bytes):
    """torch's restricted unpickler on ``data``, storages made empty of the claimed size."""
    from torch import _weights_only_unpickler as wou

    unpickler = wou.Unpickler(io.BytesIO(data), encoding="utf-8")
    unpickler.persistent_load = lambda pid: torch.storage.TypedStorage(
        pid[4], dtype=pid[1].dtype if hasattr(pid[1], "dtype") else torch.uint8, _internal=True)
    return unpickler.load()


def bench_prescan(repeats: int) -> list[dict]:
    rows = []
    for name, data in pickles().items():
        mb = len(data) / 2**20
        old, new, unpickle = [], [], []
        for _ in range(repeats):  # interleaved: a busy machine slows both alike
            old.append(_median_time(lambda: globals_in_pickle(data), 1))
            new.append(_median_time(lambda: scan_pickle(data), 1))
            unpickle.append(_median_time(lambda: _torch_unpickle(data), 1))
        o, n, u = (statistics.median(x) / mb for x in (old, new, unpickle))
        rows.append({"pickle": name, "mb": round(mb, 3), "ops": scan_pickle(data).ops, "old_s_per_mb": o,
                     "new_s_per_mb": n, "speedup": o / n, "torch_unpickle_s_per_mb": u})
        print(f"{name:42s} {mb:7.2f} MB  old {o:6.3f} s/MB  new {n:6.3f} s/MB  x{o / n:5.1f}   "
              f"(torch unpickling {u:6.3f} s/MB)")
    return rows


def bombs(d: Path) -> dict[str, Path]:
    sys.path.insert(0, str(ROOT / "tests" / "loading"))
    import test_hostile_files as h  # the generators of the hostile-file tests

    base = {"model": {"w": torch.ones(4, 4)}, "hparams": {"lr": 0.1}}
    buf = io.BytesIO()
    torch.save(base, buf)
    out = {"zip bomb (300 MB pickle, deflated)": h._zip_bomb(buf.getvalue(), d / "zip_bomb.pt", 300 * 2**20)}

    def spliced(name, fragment, front=False):
        obj = {"hostile": h.MARKER, **base} if front else {**base, "hparams": {"lr": 0.1, "hostile": h.MARKER}}
        return h.splice(obj, fragment, d / name)

    out["memo bomb (40 KB, fan-out 1000^6)"] = spliced("memo.pt", h._dag_lists(6, width=1000))
    out["memo bomb (binary, depth 40)"] = spliced("memo2.pt", h._dag_lists(40))
    out["200k-deep nested tuples"] = spliced("deep_tuples.pt", h.N + b"\x85" * 200_000)
    out["200k-deep nested lists (loads)"] = spliced("deep_lists.pt", b"]" * 200_000 + b"a" * 199_999)
    out["4M+ opcodes"] = spliced("ops.pt", b"](" + b"N" * 4_000_010 + b"e")
    out["5000 colliding big ints as keys"] = spliced("flood.pt", h._colliding_ints(5000))
    torch.save({"model": {"w": torch.zeros(1).expand(2**20, 2**20)}}, d / "stride0.pt")
    out["(2^20, 2^20) stride-0 tensor"] = d / "stride0.pt"
    return out


OLD_CHILD = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from sam_probe.loading.checkpoints import load_checkpoint
t0 = time.perf_counter()
try:
    ck = load_checkpoint(sys.argv[2]); ck.nonfinite(); out = "loaded"
except Exception as exc:
    out = type(exc).__name__
print(f"{time.perf_counter() - t0:.3f} {out}")
"""


def _old_package(rev: str) -> Path | None:
    d = Path(tempfile.mkdtemp()) / "old"
    try:
        for rel in ("sam_probe/__init__.py", "sam_probe/errors.py", "sam_probe/loading/checkpoints.py",
                    "sam_probe/loading/safe_pickle.py"):
            src = subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=ROOT, capture_output=True, check=True).stdout
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_bytes(src if not rel.endswith("sam_probe/__init__.py") else b"")
        (d / "sam_probe/loading/__init__.py").write_text("")
    except (subprocess.CalledProcessError, OSError):
        return None
    return d


def bench_bombs(repeats: int, old_rev: str) -> list[dict]:
    rows = []
    old = _old_package(old_rev)
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in bombs(Path(tmp)).items():
            outcome = []

            def attempt():
                try:
                    load_checkpoint(path)
                    outcome.append("loaded")
                except CheckpointError as exc:
                    outcome.append(str(exc).split(": ", 1)[1][:70])

            t = _median_time(attempt, repeats)
            before = "n/a"
            if old is not None:
                try:
                    r = subprocess.run([sys.executable, "-c", OLD_CHILD, str(old), str(path)], capture_output=True,
                                       text=True, timeout=30, cwd=tempfile.gettempdir())
                    before = r.stdout.strip() or f"died (rc {r.returncode})"
                    if r.returncode < 0:
                        before = f"killed by signal {-r.returncode}"
                except subprocess.TimeoutExpired:
                    before = "> 30 s (stopped)"
            rows.append({"file": name, "size_kb": round(path.stat().st_size / 1024, 1), "seconds": t,
                         "outcome": outcome[-1], "previous_loader": before})
            print(f"{name:40s} {path.stat().st_size / 1024:9.1f} KB  {t:7.3f} s  {outcome[-1][:60]:60s}  "
                  f"previous: {before}")
    return rows


def bench_big(mb: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.pt"
        n = mb * 2**20 // 4 // 64
        torch.save({"model": {f"layer{i}.weight": torch.randn(n // 64, 64) for i in range(64)}, "step": 1}, path)
        size = path.stat().st_size / 2**20

        def ours():
            from sam_probe.loading import verify

            verify.forget()  # a first read: nothing remembered about the file
            ck = load_checkpoint(path)
            return sum(float(t.sum()) for t in ck.state.values())

        def torch_only():
            obj = torch.load(path, mmap=True, weights_only=True)
            return sum(float(t.sum()) for t in obj["model"].values())

        a, b = [], []
        for _ in range(repeats):
            a.append(_median_time(ours, 1))
            b.append(_median_time(torch_only, 1))
        ma, mb_ = statistics.median(a), statistics.median(b)
        print(f"legit {size:.0f} MB checkpoint: load_checkpoint + one pass {ma:.3f} s, torch.load(mmap) + one pass "
              f"{mb_:.3f} s, ratio {ma / mb_:.2f}")
        return {"size_mb": size, "sam_probe_s": ma, "torch_load_mmap_s": mb_, "ratio": ma / mb_}


ANALYSIS_CHILD = r"""
import sys, time, statistics
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
from sam_probe.loading.checkpoints import file_sha256, load_checkpoint
path, repeats = sys.argv[2], int(sys.argv[3])
times = []
for _ in range(repeats):
    t0 = time.perf_counter()
    ck = load_checkpoint(path); ck.nonfinite(); del ck
    file_sha256(path)
    ck = load_checkpoint(path); ck.nonfinite()
    sum(float(t.sum()) for t in ck.state.values())
    times.append(time.perf_counter() - t0)
    del ck
print(statistics.median(times))
"""


def _old_tree(rev: str) -> Path | None:
    """The whole ``sam_probe`` package of git revision ``rev`` in a temporary folder."""
    d = Path(tempfile.mkdtemp())
    try:
        tar = subprocess.run(["git", "archive", rev, "sam_probe"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(d)], input=tar, check=True)
    except (subprocess.CalledProcessError, OSError):
        return None
    return d


def bench_analysis_read(mb: int, repeats: int, old_rev: str) -> dict:
    from sam_probe.loading import verify
    from sam_probe.loading.checkpoints import file_sha256

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.pt"
        n = mb * 2**20 // 4 // 64
        torch.save({"model": {f"layer{i}.weight": torch.randn(n // 64, 64) for i in range(64)}, "step": 1}, path)
        size = path.stat().st_size / 2**20

        def ours():
            verify.forget()
            ck = load_checkpoint(path)
            ck.nonfinite()
            del ck
            file_sha256(path)
            ck = load_checkpoint(path)
            ck.nonfinite()
            return sum(float(t.sum()) for t in ck.state.values())

        def torch_only():
            obj = torch.load(path, mmap=True, weights_only=True)
            return sum(float(t.sum()) for t in obj["model"].values())

        passes = verify.PASSES[0]
        ours()
        passes = verify.PASSES[0] - passes
        a, b = [], []
        for _ in range(repeats):
            a.append(_median_time(ours, 1))
            b.append(_median_time(torch_only, 1))
        ma, mb_ = statistics.median(a), statistics.median(b)
        old_s = None
        old = _old_tree(old_rev)
        if old is not None:
            r = subprocess.run([sys.executable, "-c", ANALYSIS_CHILD, str(old), str(path), str(repeats)],
                               capture_output=True, text=True, timeout=3600, cwd=tempfile.gettempdir())
            old_s = float(r.stdout.strip()) if r.returncode == 0 and r.stdout.strip() else None
        print(f"analysis read of a {size:.0f} MB checkpoint: this revision {ma:.3f} s ({passes} pass over the file), "
              f"previous {old_s if old_s is None else round(old_s, 3)} s, torch.load(mmap) + one read {mb_:.3f} s; "
              f"ratios {ma / mb_:.2f} (this) and {old_s / mb_ if old_s else float('nan'):.2f} (previous)")
        return {"size_mb": size, "sam_probe_s": ma, "previous_revision": old_rev, "previous_s": old_s,
                "torch_load_mmap_plus_one_read_s": mb_, "ratio": ma / mb_,
                "previous_ratio": (old_s / mb_) if old_s else None, "passes_over_the_file": passes,
                "sequence": "load + nonfinite (ordering), sha256 (unit key), load + nonfinite (compute), "
                            "one read of every weight"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--big-mb", type=int, default=512)
    ap.add_argument("--old-rev", default="af3bddd")
    ap.add_argument("--analysis-old-rev", default="74234c4", help="revision before the one-pass loader")
    ap.add_argument("--only", choices=("all", "big"), default="all", help="big: redo sections 3 and 4 only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out = ROOT / "bench" / "results" / "loading.json"
    if args.only == "big":  # refresh sections 3 and 4, keep the others as measured
        import json

        results = json.loads(out.read_text())
        results.pop("seconds_total", None)
        results["environment"] = environment()
    else:
        results = {"environment": environment(), "prescan": bench_prescan(args.repeats),
                   "bombs": bench_bombs(max(1, args.repeats // 2), args.old_rev)}
    results["big_checkpoint"] = bench_big(args.big_mb, args.repeats)
    results["analysis_read"] = bench_analysis_read(args.big_mb, args.repeats, args.analysis_old_rev)
    write_results(out, results, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
