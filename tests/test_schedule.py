"""The collection order handed to pytest-xdist's work stealing."""

from dsv4shard.testing.schedule import front_loaded, share_sizes


def test_shares_are_dealt_as_work_stealing_deals_them():
    assert share_sizes(10, 3) == [3, 3, 4] and sum(share_sizes(635, 16)) == 635
    assert share_sizes(2, 4) == [0, 0, 1, 1]


def test_long_tests_open_the_shares_and_the_rest_keep_their_order():
    items = list(range(20))
    long_ones = {19: 0, 3: 1, 11: 2}  # test: rank, 0 the longest
    out = front_loaded(items, 4, long_ones.get)
    assert sorted(out) == items
    starts = [sum(share_sizes(20, 4)[:k]) for k in range(4)]
    assert [out[s] for s in starts[:3]] == [19, 3, 11]
    assert [i for i in out if i not in long_ones] == [i for i in items if i not in long_ones]
    # More long ones than workers: a second round, second in each share.
    many = front_loaded(items, 2, lambda i: i if i < 4 else None)
    assert many[:2] == [0, 2] and many[10:12] == [1, 3] and sorted(many) == items
    assert front_loaded(items, 1, lambda i: 0) == items


def test_every_test_started_first_exists():
    """A renamed test would silently leave the table: each name is a test."""
    import importlib

    import conftest

    for nodeid in conftest.STARTED_FIRST:
        path, name = nodeid.split("::")
        module = importlib.import_module(path[:-3].replace("/", "."))
        assert callable(getattr(module, name.split("[")[0], None)), nodeid
