"""Implementations of linear attention; they never import each other."""
