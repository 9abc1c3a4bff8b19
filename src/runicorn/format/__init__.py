"""What a manifest is: the run-layout rules, the manifest model with its validation, and
the JSON and gzip codecs. Pure data and rules; no I/O beyond decoding bytes handed in."""
