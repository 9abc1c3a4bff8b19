"""Operating-system helpers every layer may use: atomic writes and locks, the
file-descriptor budget, usable CPU cores, pausing the cyclic collector. Nothing here knows
about manifests or runs."""
