"""The training loop's user-facing error and exit code (the CLI turns them into one line)."""

from __future__ import annotations

#: `mtcmkd train`'s exit status when the run saved a checkpoint after a preemption warning and
#: wants a requeue (slurm/train.sh resubmits it with --resume).
EXIT_PREEMPTED = 3


class TrainError(RuntimeError):
    """A user-facing problem (bad resume, store without cases for this fold, ...)."""
