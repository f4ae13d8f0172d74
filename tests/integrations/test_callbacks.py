"""Training callbacks with the real packages on tiny models: the logged lambda_max at step N equals the
top eigenvalue of the model's weights at step N recomputed from a run without the probe (dense Hessian for
the Lightning MLP, ``sp.top_eigen`` on a fresh objective for the Trainer's BERT),
the values reach the trainers' logs, and training is bit-identical with and without the callback (dropout
and shuffling draw the same random numbers, BatchNorm statistics and weights are untouched)."""
from __future__ import annotations

import copy

import pytest
import torch

import sam_probe as sp
from sam_probe.core.dense import dense_hessian

OPTS = dict(dtype="float64", tol=1e-8)


def dense_top(model, x, y, loss=None) -> float:
    obj = sp.Objective(model, x, y, loss, dtype=torch.float64)
    return float(torch.linalg.eigvalsh(dense_hessian(obj))[-1])


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------ Lightning
def lightning_fit(tmp_path, callback):
    L = pytest.importorskip("lightning.pytorch", reason="lightning does not install here")
    from torch import nn
    from torch.nn import functional as F

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.2), nn.Linear(6, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.3)

    L.seed_everything(0, verbose=False)
    x, y = torch.randn(48, 4), torch.randint(0, 3, (48,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=12, shuffle=True)
    model = Net()
    snapshots: dict[int, dict] = {}

    class Snapshot(L.Callback):  # what the weights are at the end of each step (copies only)
        def on_train_batch_end(self, trainer, pl_module, *args):
            snapshots[trainer.global_step] = copy.deepcopy(pl_module.state_dict())

    from lightning.pytorch.loggers import CSVLogger

    trainer = L.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path, name="logs"),
                        callbacks=[Snapshot(), *([callback] if callback else [])], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(model, loader)
    return model, snapshots, trainer, (x[:24], y[:24])


@pytest.mark.slow  # two Lightning fits: ~5 s on 2 idle cores, most of it importing lightning
def test_lightning_callback_logs_lambda_max_and_changes_nothing(tmp_path):
    pytest.importorskip("lightning", reason="lightning does not install here")
    from sam_probe.integrations.lightning import SamProbeCallback

    probe_x = torch.randn(24, 4, generator=torch.Generator().manual_seed(5))
    probe_y = torch.randint(0, 3, (24,), generator=torch.Generator().manual_seed(6))
    probe = SamProbeCallback("sharpness", every_n_steps=3, data=(probe_x, probe_y), loss="ce", **OPTS)
    with_cb, _, trainer, _ = lightning_fit(tmp_path / "a", probe)
    without, snaps, _, _ = lightning_fit(tmp_path / "b", None)
    assert_same_weights(with_cb.state_dict(), without.state_dict())  # BN running stats included

    assert [h["step"] for h in probe.history] == [3, 6]
    for h in probe.history:
        net = copy.deepcopy(without)
        net.load_state_dict(snaps[h["step"]])
        assert h["sam_probe/lambda_max"] == pytest.approx(dense_top(net, probe_x, probe_y, "ce"), rel=1e-7)
        assert h["sam_probe/sam_sharpness"] == pytest.approx(
            sp.sam_sharpness(sp.Objective(net, probe_x, probe_y, "ce", dtype=torch.float64), rho=0.05), rel=1e-9)
    assert trainer.callback_metrics["sam_probe/lambda_max"] == pytest.approx(probe.history[-1]["sam_probe/lambda_max"])
    import csv

    (metrics,) = (tmp_path / "a" / "logs").glob("version_*/metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("sam_probe/lambda_max")]
    assert [(int(r["step"]), float(r["sam_probe/lambda_max"])) for r in rows] == \
        [(h["step"], h["sam_probe/lambda_max"]) for h in probe.history]
    assert any(r.get("train_loss") for r in csv.DictReader(metrics.open()))  # beside the loss


@pytest.mark.slow
def test_lightning_callback_on_the_training_batch_and_other_analyses(tmp_path):
    pytest.importorskip("lightning", reason="lightning does not install here")
    from sam_probe.integrations.lightning import SamProbeCallback

    probe = SamProbeCallback("ratios", every_n_steps=6, module="net")  # data: the batch just trained on
    SamProbeCallback("trace", every_n_steps=1)  # the other analyses are accepted
    with pytest.raises(ValueError, match="sharpness"):
        SamProbeCallback("sharpnes")
    with pytest.raises(ValueError, match="top_k"):
        SamProbeCallback("sharpness", topk=3)
    lightning_fit(tmp_path / "a", probe)
    (h,) = probe.history
    from types import SimpleNamespace

    import lightning.pytorch as L

    class NoForward(L.LightningModule):  # trains self.net in training_step, has no forward
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 3)

    batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    with pytest.raises(ValueError, match="module='net'"):
        SamProbeCallback("lambda_max", 1).on_train_batch_end(SimpleNamespace(global_step=1), NoForward(), None, batch, 0)
    assert h["step"] == 6 and sum(v for k, v in h.items() if k.startswith("sam_probe/fraction.")) == pytest.approx(1)


# ------------------------------------------------------------------ transformers Trainer
def hf_train(tmp_path, callback, report_to=()):
    pytest.importorskip("transformers", reason="transformers does not install here")
    from hftiny import bert, token_batch
    from transformers import Trainer, TrainingArguments, TrainerCallback

    data = token_batch(16, seed=3)
    rows = [{k: v[i] for k, v in data.items()} for i in range(16)]
    model = bert(seed=0).train()  # dropout 0.1: the Trainer's RNG must be untouched by the probe
    snapshots: dict[int, dict] = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            snapshots[state.global_step] = copy.deepcopy(model.state_dict())

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=0.1,
                             logging_steps=100, save_strategy="no", report_to=list(report_to), use_cpu=True, seed=0,
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[Snapshot()])
    if callback is not None:  # ahead of the report_to integrations, which then log its numbers too
        trainer.callback_handler.callbacks.insert(0, callback)
    trainer.train()
    return model, snapshots, trainer


@pytest.mark.slow  # two Trainer runs: ~6 s on 2 idle cores, most of it importing transformers' Trainer
def test_trainer_callback_logs_beside_the_loss_and_changes_nothing(tmp_path):
    pytest.importorskip("transformers", reason="transformers does not install here")
    from hftiny import token_batch

    from sam_probe.integrations.transformers import SamProbeCallback

    batch = token_batch(8, seed=9)
    probe = SamProbeCallback("sharpness", every_n_steps=2, data=batch, **OPTS)
    with_cb, _, trainer = hf_train(tmp_path / "a", probe, report_to=["tensorboard"])
    without, snaps, _ = hf_train(tmp_path / "b", None)
    assert_same_weights(with_cb.state_dict(), without.state_dict())

    assert [h["step"] for h in probe.history] == [2, 4]
    logged = [r for r in trainer.state.log_history if "sam_probe/lambda_max" in r]
    assert [r["step"] for r in logged] == [2, 4] and all("loss" in r for r in logged)  # the loss row of that step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (tmp_path / "a").glob("**/events.out.tfevents.*")
    ea = EventAccumulator(str(events.parent))
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("train/sam_probe/lambda_max")] == \
        [(h["step"], pytest.approx(h["sam_probe/lambda_max"], rel=1e-6)) for h in probe.history]
    assert "train/loss" in ea.Tags()["scalars"]
    for h, r in zip(probe.history, logged):
        assert r["sam_probe/lambda_max"] == h["sam_probe/lambda_max"]
        net = copy.deepcopy(without)
        net.load_state_dict(snaps[h["step"]])
        again = sp.top_eigen(sp.Objective(net.eval(), dict(batch), dtype=torch.float64), k=1, tol=1e-10)
        assert h["sam_probe/lambda_max"] == pytest.approx(float(again.eigenvalues[0]), rel=1e-7)
