"""dsv4shard's pytest plugin (registered as a ``pytest11`` entry point, so a
port's own CI gets it with ``pip install dsv4shard``).

Options choose the implementation under test and where real ranks run:
``--shard-impl module:function``, ``--ranks N``, ``--hostfile PATH``.
"""

from __future__ import annotations

import os

import pytest

from dsv4shard import impl

DEFAULT_FUSE_IMPL = "dsv4shard.fuse:install_fused"
DEFAULT_SHARD_IMPL = "dsv4shard.shard:shard"


def load_impl(spec: str, option: str = "implementation"):
    try:
        return impl.load(spec)
    except ValueError as error:
        raise pytest.UsageError(f"{option}: {error}") from error


def pytest_addoption(parser):
    group = parser.getgroup("dsv4shard")
    group.addoption("--fuse-impl", default=DEFAULT_FUSE_IMPL, metavar="MODULE:FUNCTION",
                    help="fused gate+up installer under test; contract: function(switch_glu) "
                         "returns the module to use, or None when it fused in place "
                         "(default: %(default)s)")
    group.addoption("--shard-impl", default=DEFAULT_SHARD_IMPL, metavar="MODULE:FUNCTION",
                    help="sharding function under test, module:function; contract: "
                         "function(moe_block, group) returns the block to use")
    group.addoption("--ranks", type=int, default=2,
                    help="real ranks started on localhost for distributed tests (default 2)")
    group.addoption("--hostfile", default=os.environ.get("DSV4SHARD_HOSTFILE"),
                    help="mlx.launch hostfile for the hardware tier "
                         "(or DSV4SHARD_HOSTFILE); its backend: jaccl, ring or nccl")
    group.addoption("--variant", action="append", default=[], metavar="MODULE_OR_FILE",
                    help="run the conformance checks of this DeepSeek-V4 variant as test items "
                         "(repeatable): a module name (mlx_lm.models.deepseek_v41) or a model "
                         "file that imports its siblings from mlx_lm.models; select only them "
                         "with -m variant")


@pytest.fixture(scope="session")
def shard_impl(request):
    """The sharding function under test (``--shard-impl``)."""
    return load_impl(request.config.getoption("--shard-impl"), "--shard-impl")


@pytest.fixture(scope="session")
def fuse_impl(request):
    """The fused gate+up installer under test (``--fuse-impl``)."""
    return load_impl(request.config.getoption("--fuse-impl"), "--fuse-impl")


def pytest_report_header(config):
    lines = []
    for option, default in (("--fuse-impl", DEFAULT_FUSE_IMPL),
                            ("--shard-impl", DEFAULT_SHARD_IMPL)):
        spec = config.getoption(option, default)
        if spec != default:
            lines.append(f"{option.lstrip('-')} under test: {spec}")
    return lines or None


@pytest.fixture(scope="session")
def rank_pool(request):
    """N real ranks on localhost (ring), alive for the whole session."""
    from dsv4shard.ranks import hostfile as hf
    from dsv4shard.ranks.pool import RankPool

    size = request.config.getoption("--ranks")
    if size < 2:
        raise pytest.UsageError(f"--ranks must be at least 2, got {size}")
    with RankPool(hf.local(size, "ring")) as pool:
        yield pool


@pytest.fixture(scope="session")
def hardware_pool(request):
    """Ranks across the hostfile's hosts; the tier skips without one."""
    from dsv4shard.ranks import hostfile as hf
    from dsv4shard.ranks.pool import RankPool

    path = request.config.getoption("--hostfile")
    if not path:
        pytest.skip("hardware tier: no hostfile (pass --hostfile or set DSV4SHARD_HOSTFILE)")
    with RankPool(hf.load(path)) as pool:
        yield pool


def pytest_configure(config):
    config.addinivalue_line("markers", "variant: a conformance check of a --variant")
    config.addinivalue_line("markers", "variant_required: a required conformance check")


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselect, so that they apply to these items
def pytest_collection_modifyitems(session, config, items):
    specs = config.getoption("--variant", default=None)
    if specs:
        from dsv4shard.variants.pytest_items import items_for

        items.extend(items_for(session, specs))
