"""Tiny transformers built from configs (no downloads), their data, and Trainer-style runs on disk."""
from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB, SEQ = 12, 6


def bert(seed: int = 0, **kw):
    """A BERT sequence classifier of 298 parameters (2 labels)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=4, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=8, max_position_embeddings=8, type_vocab_size=2, num_labels=2, **kw)
    return BertForSequenceClassification(cfg).eval()


def gpt2(seed: int = 0, **kw):
    """A GPT-2 causal LM of 260 parameters, ``lm_head`` tied to the token embedding."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=8, n_embd=4, n_layer=1, n_head=2, n_inner=8,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0, **kw)
    return GPT2LMHeadModel(cfg).eval()


def perturb(model, scale: float = 0.3, seed: int = 1):
    """Move every weight off its init (a 'trained' checkpoint with non-trivial curvature)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def token_batch(n: int = 10, seed: int = 0, pad: bool = True, labels: str | None = "class") -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask`` (ragged lengths padded with 0) and ``labels``:
    ``class`` -> one label per sequence, ``lm`` -> the ids with padding set to -100, None -> none."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    if pad:
        lengths = torch.randint(3, SEQ + 1, (n,), generator=g)
        for i, l in enumerate(lengths.tolist()):
            mask[i, l:] = 0
            ids[i, l:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if labels == "class":
        out["labels"] = (ids[:, 1] % 2).long()
    elif labels == "lm":
        out["labels"] = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return out


def write_trainer_run(root: Path, model_fn=bert, steps=(2, 4), data: dict | None = None) -> Path:
    """A Hugging Face Trainer output dir: ``checkpoint-N/`` with config, weights, ``trainer_state.json``."""
    root.mkdir(parents=True, exist_ok=True)
    model = model_fn()
    for i, step in enumerate(steps):
        perturb(model, 0.2, seed=10 + i)
        d = root / f"checkpoint-{step}"
        model.save_pretrained(d)
        (d / "trainer_state.json").write_text(json.dumps(
            {"global_step": step, "epoch": i + 1.0, "log_history": [{"step": step, "learning_rate": 0.05, "loss": 1.0}]}))
    if data is not None:
        torch.save(data, root / "data.pt")
    return root
