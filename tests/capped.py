"""Running hostile cases in a child process whose address space is capped (memory is the point there)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PRELUDE = r"""
import json, os, resource, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize")) * 1024
cap = vm + {extra}
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
"""


def run_capped(body: str, *, extra: int = 3 * 2**29, timeout: int = 600, **values) -> dict:
    """Run ``body`` (Python, after torch is imported and ``RLIMIT_AS`` is set to the current size plus
    ``extra`` bytes) in a child; ``body`` prints one JSON line, returned here.  ``values`` are passed in
    as JSON (variable ``ARGS``).  The child must exit normally: no signal, nothing escaping."""
    code = PRELUDE.format(tests=str(ROOT / "tests"), extra=extra) + f"ARGS = json.loads({json.dumps(json.dumps(values))})\n" + body
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"child exited with {proc.returncode}: {proc.stderr[-2000:]}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(lines[-1])
