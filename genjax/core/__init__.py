"""What every family and the loop share, below both: the Task protocol (`task`), optimizers from config (`optim`),
per-example randomness (`random`) and checkpoints on disk (`checkpoint`, `checksums`)."""
from genjax.core.optim import make_optimizer
from genjax.core.task import Phase, Task

__all__ = ["Phase", "Task", "make_optimizer"]
