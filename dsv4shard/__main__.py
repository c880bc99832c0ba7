"""``python -m dsv4shard``: the ``dsv4shard`` command."""

import sys

from dsv4shard.cli import main

sys.exit(main())
