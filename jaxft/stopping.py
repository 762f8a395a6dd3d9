"""Early stopping on an eval metric (the loss by default), and which evaluation was the best.

An evaluation improves on the best so far when its metric is better by more than
`min_delta` (lower in mode "min", higher in "max"); `patience` evaluations in a row
without one stop the run (Keras' EarlyStopping semantics; with min_delta = 0, Hugging
Face's EarlyStoppingCallback decides the same). The best evaluation is tracked whether or not stopping is on,
for `eval.keep_best`. The state travels in each checkpoint's meta, so a resumed run
counts on from where it stopped; a stopped run resumed with a larger patience (or none)
trains on.
"""

import dataclasses


@dataclasses.dataclass
class EarlyStopping:
    patience: int = 0  # 0: never stop early
    min_delta: float = 0.0
    mode: str = "min"  # "min": lower is better (a loss); "max": higher is better (accuracy, BLEU, ...)
    metric: str = "eval_loss"  # what is judged (the key in the eval metrics), kept with the state
    best_value: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped_at: int | None = None  # the step at which patience ran out

    def __post_init__(self):
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")

    def update(self, step: int, value: float) -> bool:
        """Record the evaluation's metric at `step`; True if it is the new best."""
        sign = 1.0 if self.mode == "min" else -1.0
        if self.best_value is None or sign * value < sign * self.best_value - self.min_delta:
            self.best_value, self.best_step, self.evals_without_improvement = value, step, 0
            return True
        self.evals_without_improvement += 1
        if self.patience and self.evals_without_improvement >= self.patience:
            self.stopped_at = step
        return False

    @property
    def should_stop(self) -> bool:
        return self.stopped_at is not None

    def to_meta(self) -> dict:
        """JSON for a checkpoint's meta."""
        return dict(metric=self.metric, best_value=self.best_value, mode=self.mode, best_step=self.best_step,
                    evals_without_improvement=self.evals_without_improvement, stopped_at=self.stopped_at)

    def restore(self, meta: dict | None) -> None:
        """Continue from a checkpoint's meta (older checkpoints carry none: start afresh). A run resumed
        judging another metric, or the same in another direction, starts the count afresh too."""
        if not meta or (meta.get("metric", "eval_loss"), meta.get("mode", "min")) != (self.metric, self.mode):
            return
        self.best_value = meta.get("best_value", meta.get("best_loss"))  # "best_loss": checkpoints before modes
        self.best_step, self.evals_without_improvement = meta["best_step"], meta["evals_without_improvement"]
        # Stopped stays stopped under the same patience; a larger one (or 0) lets the run go on.
        out_of_patience = self.patience and self.evals_without_improvement >= self.patience
        self.stopped_at = meta["stopped_at"] if out_of_patience else None
