"""Third-party-style implementations the suite is run against in its own
tests: written apart from dsv4shard's, with the contracts of ``--fuse-impl``
and ``--shard-impl``."""
