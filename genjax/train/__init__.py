"""The one training loop every family uses. See `genjax.core.task` for how a family plugs in."""
