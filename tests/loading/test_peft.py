"""PEFT LoRA adapter folders on their base model, against peft itself (float64).

The fixture is written by the real ``peft`` (``get_peft_model(...).save_pretrained(...)``) on a
tiny GPT-2 built from a config; the reference loss, gradient and dense Hessian with respect to the
adapter's factors are those of peft's own model (eager attention, plain autograd).  Hostile
adapters (modules the base lacks, other shapes, bad configs, no base) are one-line errors, exit 2.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch.func import functional_call

pytest.importorskip("transformers")
peft = pytest.importorskip("peft", reason="peft does not install beside this torch")

import hftiny  # noqa: E402
from clitools import run_cli  # noqa: E402

OPTS = ("--dtype", "float64", "--no-store", "--no-plot", "--json")


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = hftiny.perturb(hftiny.gpt2(), 0.3)
    base.save_pretrained(root / "base")
    torch.manual_seed(5)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                          lora_dropout=0.0, init_lora_weights=False)  # random A and B: a non-zero adapter
    peft.get_peft_model(base, cfg).save_pretrained(root / "adapter")
    batch = hftiny.token_batch(10, labels=None)
    torch.save(batch, root / "tokens.pt")
    return root


def _reference(root, merge: bool = False):
    """peft's model in float64 (eager attention): loss, gradient and Hessian w.r.t. the trainable tensors."""
    from transformers import GPT2LMHeadModel

    base = GPT2LMHeadModel.from_pretrained(root / "base", attn_implementation="eager", local_files_only=True)
    model = peft.PeftModel.from_pretrained(base.double(), root / "adapter", is_trainable=True).double().eval()
    if merge:
        model = model.merge_and_unload().eval()
        for p in model.parameters():
            p.requires_grad_(True)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, shapes = [n for n, _ in named], [p.shape for _, p in named]
    w0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    batch = torch.load(root / "tokens.pt")
    labels = torch.where(batch["attention_mask"].bool(), batch["input_ids"], torch.full_like(batch["input_ids"], -100))

    def f(w):
        d, o = {}, 0
        for n, s in zip(names, shapes):
            d[n] = w[o:o + s.numel()].reshape(s)
            o += s.numel()
        logits = functional_call(model, d, (), batch).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))

    w = w0.clone().requires_grad_(True)
    g = torch.autograd.grad(f(w), w)[0]
    H = torch.autograd.functional.hessian(f, w0, vectorize=True) if not merge else None
    return float(f(w0)), g, H, dict(zip(names, shapes))


def test_adapter_loss_gradient_and_top_eigenvalue_equal_peft(lora):
    loss, g, H, names = _reference(lora)
    common = ("--base-model", lora / "base", "--data", lora / "tokens.pt", *OPTS)
    res = run_cli("gradnorm", lora / "adapter", *common)
    assert res.code == 0, res.stderr
    r = res.json()["results"][0]
    assert r["n_params"] == g.numel() == 56  # the factors only: c_attn (2x4 + 12x2) and c_fc (2x4 + 8x2)
    assert r["loss"] == pytest.approx(loss, rel=1e-10)
    assert r["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-9)
    ours = {p["name"]: p["norm"] for p in r["per_tensor"]}
    theirs, o = {}, 0
    for n, shape in names.items():  # peft: base_model.model.<m>.lora_A.default.weight
        theirs[n.removeprefix("base_model.model.").replace(".default.", ".")] = float(g[o:o + shape.numel()].norm())
        o += shape.numel()
    assert ours == pytest.approx(theirs, rel=1e-9)
    sh = run_cli("sharpness", lora / "adapter", *common, "--top-k", "2", "--tol", "1e-9", "--rho", "0")
    assert sh.code == 0, sh.stderr
    top = torch.linalg.eigvalsh(H).flip(0)[:2]
    assert sh.json()["results"][0]["eigenvalues"] == pytest.approx(top.tolist(), rel=1e-7)
    assert sh.json()["results"][0]["source"]["layout"] == "peft-lora"


def test_merged_adapter_equals_peft_merge_and_unload(lora):
    loss, g, _, _ = _reference(lora, merge=True)
    res = run_cli("gradnorm", lora / "adapter", "--base-model", lora / "base", "--merge-adapter", "--data",
                  lora / "tokens.pt", *OPTS)
    assert res.code == 0, res.stderr
    r = res.json()["results"][0]
    assert r["n_params"] == g.numel() == 260  # every base parameter (lm_head tied to wte: once)
    assert r["loss"] == pytest.approx(loss, rel=1e-10)
    assert r["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-9)


def _copy(lora, tmp_path, name="bad"):
    d = tmp_path / name
    shutil.copytree(lora / "adapter", d)
    return d


def _one_line_error(res, *words):
    """Exit 2 and one ``error:`` line saying it all (after the unit's progress line, when a unit failed)."""
    assert res.code == 2, (res.code, res.stderr)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr
    for w in words:
        assert w in errors[0], errors[0]


def test_hostile_adapters_are_one_line_errors(lora, tmp_path):
    from safetensors.torch import load_file, save_file

    common = ("--data", lora / "tokens.pt", "--no-store", "--no-plot")
    _one_line_error(run_cli("gradnorm", lora / "adapter", *common), "LoRA adapter", "--base-model")
    _one_line_error(run_cli("gradnorm", lora / "adapter", "--base-model", tmp_path / "nope", *common),
                    "--base-model", "no such file")
    _one_line_error(run_cli("gradnorm", lora / "adapter", "--merge-adapter", *common), "--base-model")
    # factors for a module the base model does not have
    d = _copy(lora, tmp_path, "ghost")
    st = load_file(d / "adapter_model.safetensors")
    save_file({k.replace("c_fc", "c_ghost"): v for k, v in st.items()}, str(d / "adapter_model.safetensors"))
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["c_attn", "c_ghost"]}))
    _one_line_error(run_cli("gradnorm", d, "--base-model", lora / "base", *common), "c_ghost",
                    "does not have", "another base model")
    # shapes that disagree with the base (an adapter of a wider model)
    d = _copy(lora, tmp_path, "wide")
    save_file({k: torch.cat([v, v], dim=1 if ".lora_A." in k else 0) if "c_fc" in k else v for k, v in st.items()},
              str(d / "adapter_model.safetensors"))
    _one_line_error(run_cli("gradnorm", d, "--base-model", lora / "base", *common), "c_fc", "do not fit")
    # target_modules that do not name an adapted module
    d = _copy(lora, tmp_path, "targets")
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["c_attn"]}))
    _one_line_error(run_cli("gradnorm", d, "--base-model", lora / "base", *common), "target_modules")
    # the base model given is itself an adapter
    _one_line_error(run_cli("gradnorm", lora / "adapter", "--base-model", lora / "adapter", *common), "adapter")


@pytest.mark.parametrize("change,words", [
    ({"r": "2"}, ["r must be an integer"]),
    ({"r": 0}, ["r must be an integer"]),
    ({"peft_type": "IA3"}, ["LoRA adapters only"]),
    ({"use_dora": True}, ["use_dora", "does not implement"]),
    ({"modules_to_save": ["lm_head"]}, ["modules_to_save"]),
    ({"rank_pattern": {"c_fc": 4}}, ["rank_pattern"]),
    ({"lora_alpha": "big"}, ["lora_alpha must be a finite number"]),
    ({"target_modules": [1, 2]}, ["target_modules"]),
    ({"r": 3}, ["rank r = 3"]),
])
def test_hostile_adapter_configs_are_refused_by_inspect(lora, tmp_path, change, words):
    d = _copy(lora, tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    res = run_cli("inspect", d)
    _one_line_error(res, "adapter_config.json" if "rank r" not in words[0] else "adapter_model", *words)


def test_adapter_config_is_bounded_and_names_nothing_imported(lora, tmp_path):
    from sam_probe.loading.sources import peft_adapter

    d = _copy(lora, tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["auto_mapping"] = {"base_model_class": "os.system", "parent_library": "subprocess"}  # never imported
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    ok = run_cli("inspect", d, "--json")
    assert ok.code == 0, ok.stderr
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "pad": "x" * (peft_adapter.MAX_CONFIG + 1)}))
    _one_line_error(run_cli("inspect", d), "adapter_config.json", "limit")


def test_a_trainer_run_of_adapters_is_one_run_in_step_order(lora, tmp_path):
    run = tmp_path / "run"
    for step in (4, 2):
        shutil.copytree(lora / "adapter", run / f"checkpoint-{step}")
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    res = run_cli("gradnorm", run, "--base-model", lora / "base", "--data", lora / "tokens.pt", *OPTS)
    assert res.code == 0, res.stderr
    rs = res.json()["results"]
    assert [r["step"] for r in rs] == [2, 4] and rs[0]["grad_norm"] == rs[1]["grad_norm"]
    import sam_probe as sp

    obj = sp.objective(run / "checkpoint-2", base_model=str(lora / "base"), data=str(lora / "tokens.pt"),
                       dtype="float64")
    assert obj.n_params == 56 and obj.loss() == pytest.approx(rs[0]["loss"], rel=1e-12)
