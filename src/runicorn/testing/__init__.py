"""Helpers for runicorn's tests and benchmarks (a throw-away OpenSSH server, WAN emulation).

Nothing here is imported by the library at runtime; it ships in the package only so that tests,
benchmarks and CI scripts share one implementation.
"""
