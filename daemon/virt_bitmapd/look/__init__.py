"""One look at one disk, as a pipeline of values (see ``run``):

gather (reads) -> decide (pure) -> act (reconcile, fill, heal, unite) -> reread (what acting
changed, once) -> judge (pure, shared with ``status``).

The service turns the result into effects (pure) and applies them (the one writer)."""
