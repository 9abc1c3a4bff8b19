"""Client side: download a manifest, diff it against the local cache, fetch what changed
(append-only files by their verified tail), and fall back to walking the remote tree."""
