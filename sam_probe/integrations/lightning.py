"""``SamProbeCallback``: a ``lightning.Callback`` that runs a sam-probe analysis every N optimizer steps
on the live module and logs it beside the loss, without saving checkpoints::

    from sam_probe.integrations.lightning import SamProbeCallback

    probe = SamProbeCallback("sharpness", every_n_steps=50, data=(x_probe, y_probe), loss="ce")
    trainer = lightning.Trainer(max_steps=500, callbacks=[probe])

At the end of a training batch whose ``trainer.global_step`` (optimizer steps done) is a multiple of
``every_n_steps``, :func:`sam_probe.integrations.live.probe` runs on ``data`` (default: the batch just
trained on; ``module="net"`` probes that attribute of the LightningModule instead of its ``forward``).
The numbers (``sam_probe/lambda_max``, ``sam_probe/sam_sharpness``, ...; keys in
:mod:`sam_probe.integrations.live`) go to every logger of the trainer at that step
(``logger.log_metrics``: not subject to ``log_every_n_steps``), to ``trainer.callback_metrics``
(monitorable, e.g. by ``ModelCheckpoint``) and to ``callback.history`` (``[{step, ...}]``).
Weights, ``.grad``, BatchNorm statistics, train/eval flags and RNG states are left as they were:
training runs exactly as it would without the callback.
"""
from __future__ import annotations

from typing import Any

from . import require
from .live import check, every, probe

_pl = require("lightning.pytorch", "lightning", "sam_probe.integrations.lightning")


class SamProbeCallback(_pl.Callback):  # type: ignore[misc, name-defined]
    def __init__(self, analysis: str = "sharpness", every_n_steps: int = 100, data: Any = None, loss: Any = None,
                 *, module: str | None = None, prefix: str = "sam_probe/", prog_bar: bool = False, **options: Any):
        check(analysis, options)
        if int(every_n_steps) < 1:
            raise ValueError("every_n_steps must be at least 1")
        self.analysis, self.every_n_steps, self.data, self.loss = analysis, int(every_n_steps), data, loss
        self.module, self.prefix, self.prog_bar, self.options = module, prefix, prog_bar, options
        self.history: list[dict[str, Any]] = []
        self._last: int | None = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)
        if not every(step, self.every_n_steps, self._last):
            return
        self._last = step
        if self.module:
            model = getattr(pl_module, self.module)
        elif type(pl_module).forward is _pl.LightningModule.forward:
            raise ValueError(f"SamProbeCallback: {type(pl_module).__name__} has no forward(); define one or "
                             "name the network it trains, e.g. SamProbeCallback(..., module='net')")
        else:
            model = pl_module
        data = self.data if self.data is not None else batch
        values = probe(model, data, self.analysis, self.loss, **self.options)
        metrics = {self.prefix + k: v for k, v in values.items()}
        self.history.append({"step": step, **metrics})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, logger=False, prog_bar=self.prog_bar)
