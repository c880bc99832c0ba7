"""The process a variant is checked in (``checking.check_isolated`` starts
it): ``python -m dsv4shard.variants.child SPEC --out REPORT.json``."""

import sys

from dsv4shard.variants.checking import main

if __name__ == "__main__":
    sys.exit(main())
