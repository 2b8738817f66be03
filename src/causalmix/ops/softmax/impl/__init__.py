"""Implementations of softmax attention. They never import each other; ``reference`` defines
correctness. Each module exposes ``can_serve(call) -> str | None`` (None = can serve, else the
reason it cannot) and ``run(call) -> (out, lse)`` (the family contract of
:mod:`causalmix.ops.registry`); ``causalmix.ops.softmax.api.REGISTRY`` maps names to them."""
