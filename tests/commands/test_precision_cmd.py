"""Half-precision checkpoints and ``--dtype bfloat16`` end to end through the command line."""
import torch

from clitools import run_cli


def _resave(src, dst, dtype):
    ck = torch.load(src, weights_only=True)
    ck["model"] = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in ck["model"].items()}
    torch.save(ck, dst)
    return dst


def test_bf16_checkpoint_loads_as_saved_and_float32_analysis_equals_the_upcast_weights(tiny_runs, tmp_path):
    src = tiny_runs["sgd"] / "step_000020.pt"
    bf16 = _resave(src, tmp_path / "bf16.pt", torch.bfloat16)
    up = _resave(bf16, tmp_path / "up32.pt", torch.float32)  # the same numbers, stored as float32
    args = ("--top-k", "1", "--tol", "1e-4", "--rho", "0", "--no-store", "--no-plot", "--json")
    a, b = run_cli("sharpness", bf16, *args), run_cli("sharpness", up, *args)
    assert a.code == 0 and b.code == 0, a.stderr + b.stderr
    ra, rb = a.json()["results"][0], b.json()["results"][0]
    assert ra["eigenvalues"] == rb["eigenvalues"] and ra["loss"] == rb["loss"]  # float32 by default, bit for bit
    assert ra.get("precision") is None
    # the upcast's memory is stated (before the objective is built); the float32 file needs no note
    assert "upcasting 460 bfloat16 parameters to float32: +1.84 kB (pass --dtype bfloat16 to run in it)" in a.stderr
    assert "upcasting" not in b.stderr
    # and the same weights run in bfloat16: float32 solver, stated accuracy, certified within it
    c = run_cli("sharpness", bf16, *args[:2], "--tol", "0.05", *args[4:], "--dtype", "bfloat16")
    assert c.code == 0, c.stderr
    rc = c.json()["results"][0]
    assert rc["precision"]["unit_roundoff"] == 2 ** -8 and rc["precision"]["solver_dtype"] == "float32"
    assert rc["solver"]["vector_bytes"] == 460 * 4 and "upcasting" not in c.stderr
    for theta, lam, r in zip(rc["eigenvalues"], ra["eigenvalues"], rc["residuals"]):
        assert r <= 0.05 and abs(theta - lam) <= r * abs(theta)


def test_too_tight_tol_with_bf16_is_one_line_exit_2_before_loading(tmp_path):
    missing = tmp_path / "garbage.pt"  # refused before any checkpoint is read
    missing.write_bytes(b"not a checkpoint")
    res = run_cli("sharpness", missing, "--dtype", "bfloat16", "--tol", "1e-6", "--no-store")
    assert res.code == 2
    line = res.stderr.strip()
    assert "\n" not in line and line.startswith("error: --tol 1e-06: bfloat16 products are accurate to about")
    assert line.endswith("pass --tol 0.032 or more, or --dtype float32")
    ok = run_cli("sharpness", missing, "--dtype", "float16", "--tol", "0.004", "--no-store")
    assert ok.code == 2 and "--tol" not in ok.stderr  # 0.004 >= float16's floor 2^-8: the file is the problem
