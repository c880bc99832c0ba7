"""The verdict engine: one table of properties, one table of
implementations, one runner that turns (property, implementation) into a
verdict.  ``dsv4shard check``, ``pytest --variant``, the suite's own tests
and the kill matrix are all views of the verdicts it gives.

- :mod:`~dsv4shard.engine.outcome`: the exceptions a property or an
  implementation raises, and the words a verdict uses;
- :mod:`~dsv4shard.engine.records`: the property table;
- :mod:`~dsv4shard.engine.run`: the runner.
"""
