"""Thin wrappers over the native layer.

Everything here raises ``OSError`` with the real errno on failure; nothing
above this package touches cffi objects.
"""
