"""Implementations of the delta-rule family: ``reference`` (the definition), ``chunk`` (WY / UT
chunked), ``recurrent`` (step by step). They never import each other."""
