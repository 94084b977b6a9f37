"""The generation engine: a FIFO queue, continuous batching and a prefix cache in front of one model."""

from .engine import Engine, EngineBusy, NotReady
from .jobs import Finished, Job, Update, apply_stop

__all__ = ["Engine", "EngineBusy", "Finished", "Job", "NotReady", "Update", "apply_stop"]
