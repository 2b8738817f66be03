"""Implementations of softmax attention. They never import each other; ``reference`` defines
correctness. Each module exposes ``can_serve(...) -> str | None`` (None = can serve, else the
reason it cannot) and ``attention(...) -> (out, lse)``."""
