"""The one training loop every family uses. See `genjax.train.task` for how a family plugs in."""
from genjax.train.task import Phase, Task
from genjax.train.optim import make_optimizer

__all__ = ["Phase", "Task", "make_optimizer"]
