"""LoRA adapters on their base model: the model an adapter checkpoint is analysed with.

An adapter checkpoint (:mod:`.sources.peft_adapter`) holds, for each adapted module ``m``
(a ``torch.nn.Linear``, or transformers' ``Conv1D`` whose weight is stored ``[in, out]``), the
factors ``A_m`` (``[r, in]``) and ``B_m`` (``[out, r]``); the adapted layer computes
``base_m(x) + s · B_m A_m x`` with ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
``use_rslora``) -- PEFT's LoRA in eval mode (no dropout).  The base model is the checkpoint the
user names with ``--base-model`` (a ``save_pretrained`` folder or any checkpoint sam-probe
reads), loaded and built under the usual rules.

* Default, the adapter's parameters: every base tensor becomes a fixed, non-persistent buffer
  of the model and each adapted module is wrapped (:class:`LoraLayer`, its factors at
  ``<m>.lora_A.weight`` / ``<m>.lora_B.weight``): losses, gradients and curvature are those of
  ``L(A, B)`` with the base frozen, ``P`` = the factors' entries.
* ``--merge-adapter``: the base architecture with ``W_m + s · B_m A_m`` (transposed for
  ``Conv1D``) in place of ``W_m`` and every base parameter a parameter: the merged model.

The adapter must fit the base: every module it names must exist there and be a Linear or
Conv1D with the factors' input and output sizes (one-line errors otherwise).  ``target_modules``
of ``adapter_config.json``, when a list, must name each adapted module (its last part, or a
dotted suffix).  Nothing the adapter's files name is imported.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, SpecError, opt

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..pipeline.session import Session
    from .checkpoints import Checkpoint
    from .matching import Matched

SOURCE = "peft-adapter"


def is_adapter(ck: Any) -> bool:
    return getattr(ck, "source", "") == SOURCE


def _lora_layer_class() -> Any:
    from torch import nn

    class LoraLayer(nn.Module):
        """``base_layer(x) + scaling · lora_B(lora_A(x))`` (PEFT's LoRA in eval mode)."""

        def __init__(self, base_layer: nn.Module, r: int, in_features: int, out_features: int, scaling: float):
            super().__init__()
            self.base_layer = base_layer
            self.lora_A = nn.Linear(in_features, r, bias=False)
            self.lora_B = nn.Linear(r, out_features, bias=False)
            self.scaling = float(scaling)

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return self.base_layer(x, *args, **kwargs) + self.lora_B(self.lora_A(x)) * self.scaling

    return LoraLayer


def base_path(session: Session, ck: Checkpoint) -> str:
    base = session.settings.base_model
    if not base:
        raise SpecError(f"{ck.path}: is a LoRA adapter (adapter_config.json); name the model it adapts with "
                        f"{opt('base_model', 'DIR')} (its save_pretrained folder or checkpoint)")
    return str(base)


def base_of(session: Session, ck: Checkpoint) -> tuple[Checkpoint, nn.Module, Matched]:
    """The base checkpoint, its model (weights applied) and its matched tensors, once per session."""
    import torch

    from ..pipeline import build

    path = base_path(session, ck)
    cache = session.__dict__.setdefault("_lora_base", {})
    if path not in cache:
        base_ck = session.load(path)
        if is_adapter(base_ck):
            raise SpecError(f"{opt('base_model', path)}: is itself an adapter; give the base model it adapts")
        model = build.build_model(session, base_ck)
        m = session.matched(base_ck, model)
        with torch.no_grad():
            own = dict(model.named_parameters())
            for n, t in m.params.items():
                own[n].copy_(t)
            bufs = dict(model.named_buffers())
            for n, t in m.buffers.items():
                if n in bufs and bufs[n] is not t and bufs[n].shape == t.shape:
                    bufs[n].copy_(t)
        cache[path] = (base_ck, model, m)
    return cache[path]


def _factors(ck: Checkpoint) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out: dict[str, Any] = {}
    for name, t in ck.state.items():
        mod, _, rest = name.rpartition(".lora_")
        out.setdefault(mod, [None, None])[0 if rest.startswith("A") else 1] = t
    return {m: (a, b) for m, (a, b) in out.items()}


def _closest(name: str, pool: list[str]) -> str:
    import difflib

    m = difflib.get_close_matches(name, pool[:5000], n=1, cutoff=0.5)
    return f" (closest: {m[0]})" if m else ""


def _sizes(ck: Checkpoint, base: str, model: nn.Module, module: str) -> tuple[int, int, bool]:
    """``(in, out, stored_transposed)`` of the adapted ``module`` of the base model (errors name both)."""
    from torch import nn

    mods = dict(model.named_modules())
    if module not in mods:
        raise CheckpointError(f"{ck.path}: has LoRA factors for module {module[:120]!r}, which the base model {base} "
                              f"does not have{_closest(module, list(mods))}; the adapter was made for another base "
                              "model")
    m = mods[module]
    w = getattr(m, "weight", None)
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features, False
    if type(m).__name__ == "Conv1D" and w is not None and w.dim() == 2:  # transformers' GPT-2 layers: [in, out]
        return int(w.shape[0]), int(w.shape[1]), True
    raise CheckpointError(f"{ck.path}: LoRA on module {module[:120]} ({type(m).__name__}) is not supported; "
                          "sam-probe adapts Linear and Conv1D layers")


def _check(ck: Checkpoint, base: str, model: nn.Module) -> dict[str, tuple[int, int, bool]]:
    targets = ck.hparams.get("target_modules")
    sizes = {}
    for module, (a, b) in _factors(ck).items():
        n_in, n_out, transposed = _sizes(ck, base, model, module)
        if tuple(a.shape)[1] != n_in or tuple(b.shape)[0] != n_out:
            raise CheckpointError(f"{ck.path}: {module[:120]}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do "
                                  f"not fit the base layer ({n_in} inputs, {n_out} outputs in {base}); the adapter "
                                  "was made for another base model")
        if isinstance(targets, list) and not any(module == t or module.endswith("." + t) for t in targets):
            raise CheckpointError(f"{ck.path}: adapter_config.json target_modules {targets[:8]} do not name module "
                                  f"{module[:120]}, which has LoRA factors; the folder is inconsistent")
        sizes[module] = (n_in, n_out, transposed)
    return sizes


def build_model(session: Session, ck: Checkpoint) -> nn.Module:
    """The model of adapter ``ck`` (module docstring): the wrapped base (factors as parameters) or,
    with ``--merge-adapter``, the base architecture whose weights :func:`merged` supplies."""
    import copy

    _, base_model, _ = base_of(session, ck)
    base = base_path(session, ck)
    model = copy.deepcopy(base_model)
    sizes = _check(ck, base, model)
    if session.settings.merge_adapter:
        return model
    _freeze(model)
    layer = _lora_layer_class()
    r, s = int(ck.hparams["lora_r"]), float(ck.hparams["lora_scaling"])
    for module, (n_in, n_out, _) in sizes.items():
        parent_name, _, attr = module.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, layer(getattr(parent, attr), r, n_in, n_out, s))
    return model


def _freeze(model: nn.Module) -> None:
    """Every parameter and buffer of ``model`` made a non-persistent buffer (the adapter's checkpoint
    holds none of them: they keep the base's values)."""
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            del mod._parameters[name]
            mod.register_buffer(name, p.detach(), persistent=False)
        for name, b in list(mod._buffers.items()):
            if b is not None and name not in mod._non_persistent_buffers_set:
                mod._non_persistent_buffers_set.add(name)


def merged(session: Session, ck: Checkpoint, model: nn.Module) -> Matched:
    """The base's tensors with ``W_m + s · B_m A_m`` for every adapted module (``--merge-adapter``)."""
    import dataclasses

    import torch

    _, _, m = base_of(session, ck)
    sizes = _check(ck, base_path(session, ck), model)
    s = float(ck.hparams["lora_scaling"])
    params = dict(m.params)
    for module, (a, b) in _factors(ck).items():
        name = f"{module}.weight"
        if name not in params:
            raise CheckpointError(f"{ck.path}: the weight of {module[:120]} is not a parameter of the base model "
                                  "(tied to another); --merge-adapter cannot merge into it")
        w = params[name]
        delta = (b.to(torch.float64) @ a.to(torch.float64)) * s
        if sizes[module][2]:
            delta = delta.T
        params[name] = (w.to(torch.float64) + delta).to(torch.promote_types(w.dtype, session.dtype))
    return dataclasses.replace(m, params=params)


def model_spec(session: Session, ck: Checkpoint) -> tuple[str, dict[str, Any]]:
    """What the stored unit names as its model: the base's spec with the adapter's settings."""
    base_ck, _, _ = base_of(session, ck)
    name, args = session.model_spec(base_ck)
    return f"lora({name})", {**args, "base": base_path(session, ck), "merged": bool(session.settings.merge_adapter),
                             "r": ck.hparams.get("lora_r"), "lora_alpha": ck.hparams.get("lora_alpha")}
