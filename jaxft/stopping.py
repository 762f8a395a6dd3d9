"""Early stopping on the eval loss, and which evaluation was the best.

An evaluation improves on the best so far when its loss is lower by more than
`min_delta`; `patience` evaluations in a row without one stop the run (Keras'
EarlyStopping semantics; with min_delta = 0, Hugging Face's EarlyStoppingCallback
decides the same). The best evaluation is tracked whether or not stopping is on,
for `eval.keep_best`. The state travels in each checkpoint's meta, so a resumed run
counts on from where it stopped; a stopped run resumed with a larger patience (or none)
trains on.
"""

import dataclasses
import math


@dataclasses.dataclass
class EarlyStopping:
    patience: int = 0  # 0: never stop early
    min_delta: float = 0.0
    best_loss: float = math.inf
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped_at: int | None = None  # the step at which patience ran out

    def update(self, step: int, loss: float) -> bool:
        """Record the eval loss at `step`; True if it is the new best."""
        if loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_step, self.evals_without_improvement = loss, step, 0
            return True
        self.evals_without_improvement += 1
        if self.patience and self.evals_without_improvement >= self.patience:
            self.stopped_at = step
        return False

    @property
    def should_stop(self) -> bool:
        return self.stopped_at is not None

    def to_meta(self) -> dict:
        """JSON for a checkpoint's meta (an infinite best, before any evaluation, as None)."""
        return dict(best_loss=None if math.isinf(self.best_loss) else self.best_loss, best_step=self.best_step,
                    evals_without_improvement=self.evals_without_improvement, stopped_at=self.stopped_at)

    def restore(self, meta: dict | None) -> None:
        """Continue from a checkpoint's meta (older checkpoints carry none: start afresh)."""
        if not meta:
            return
        self.best_loss = math.inf if meta["best_loss"] is None else meta["best_loss"]
        self.best_step, self.evals_without_improvement = meta["best_step"], meta["evals_without_improvement"]
        # Stopped stays stopped under the same patience; a larger one (or 0) lets the run go on.
        out_of_patience = self.patience and self.evals_without_improvement >= self.patience
        self.stopped_at = meta["stopped_at"] if out_of_patience else None
