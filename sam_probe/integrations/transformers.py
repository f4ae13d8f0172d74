"""``SamProbeCallback``: a ``transformers.TrainerCallback`` that runs a sam-probe analysis every N
optimizer steps on the live model and logs it beside the loss, without saving checkpoints::

    from sam_probe.integrations.transformers import SamProbeCallback

    probe = SamProbeCallback("sharpness", every_n_steps=50, data={"input_ids": ids, "labels": ids})
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[probe])

At the end of a step whose ``state.global_step`` is a multiple of ``every_n_steps``,
:func:`sam_probe.integrations.live.probe` runs on ``data`` (a batch: a dict of tensors with ``labels``,
or ``(inputs, targets)``; ``loss`` as in :class:`sam_probe.Objective`, default the model's kind: ``lm``
for causal LMs, ``ce`` for integer labels) and asks the Trainer to log at that step; the numbers
(``sam_probe/lambda_max``, ...; keys in :mod:`sam_probe.integrations.live`) join that step's ``logs``
(the loss row of ``state.log_history``, and what the callbacks after this one see) and
``callback.history``.  ``report_to`` integrations (TensorBoard, W&B) run before user callbacks: put this
callback before them with ``trainer.callback_handler.callbacks.insert(0, probe)`` for them to see it.
Weights, ``.grad``, BatchNorm statistics, train/eval flags and RNG states are left as they were.
"""
from __future__ import annotations

from typing import Any

from . import require
from .live import check, every, probe

_tf = require("transformers", "transformers", "sam_probe.integrations.transformers")


class SamProbeCallback(_tf.TrainerCallback):  # type: ignore[misc, name-defined]
    def __init__(self, analysis: str = "sharpness", every_n_steps: int = 100, data: Any = None, loss: Any = None,
                 *, prefix: str = "sam_probe/", **options: Any):
        check(analysis, options)
        if data is None:
            raise ValueError("data: give the batch to probe on (a dict with labels, or (inputs, targets))")
        if int(every_n_steps) < 1:
            raise ValueError("every_n_steps must be at least 1")
        self.analysis, self.every_n_steps, self.data, self.loss = analysis, int(every_n_steps), data, loss
        self.prefix, self.options = prefix, options
        self.history: list[dict[str, Any]] = []
        self._last: int | None = None
        self._pending: dict[str, float] | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        step = int(state.global_step)
        if model is None or not every(step, self.every_n_steps, self._last):
            return control
        self._last = step
        values = probe(model, self.data, self.analysis, self.loss, **self.options)
        self._pending = {self.prefix + k: v for k, v in values.items()}
        self.history.append({"step": step, **self._pending})
        control.should_log = True
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> Any:
        if self._pending is None or logs is None:
            return control
        logs.update(self._pending)
        row = state.log_history[-1] if state.log_history else None
        if row is not None and row.get("step") == state.global_step:
            row.update(self._pending)
        self._pending = None
        return control
