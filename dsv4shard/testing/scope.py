"""What a third-party implementation may decline, and how a refusal is judged.

An installer or sharder declines a configuration by raising
``NotImplementedError`` (Python's word for "not supported").  Declining a
configuration beyond DeepSeek-V4's own (``strategies.extended_features``:
linear biases, a format no V4 checkpoint uses, an nvfp4 global scale, an
uneven split) is the implementation's right: the case is *declined*, never a
failure.  Declining one of DeepSeek-V4's own configurations fails, saying so.
"""

from __future__ import annotations

from dsv4shard.engine.outcome import one_line
from dsv4shard.testing.report import fail
from dsv4shard.testing.strategies import describe_case, extended_features

BEYOND = ("linear biases, a format no DeepSeek-V4 checkpoint uses, an nvfp4 global scale, "
          "an uneven split")


def declined(prop, case, what: str, error: NotImplementedError, **impl):
    """Re-raise ``error`` (the case is declined, with the implementation's
    own message) when the case is beyond DeepSeek-V4's configurations; fail
    ``prop`` otherwise, saying so."""
    message = one_line(error) or "NotImplementedError"
    if extended_features(case):
        raise error
    fail(prop, case, f"{what} declined a DeepSeek-V4 configuration ({describe_case(case)}) "
         f"with NotImplementedError: {message}. DeepSeek-V4 checkpoints need it: only "
         f"configurations beyond them ({BEYOND}) may be declined", **impl)


def on_what(case) -> str:
    """Where a crash happened: the configuration, and whether an
    implementation may decline it."""
    beyond = extended_features(case)
    if beyond:
        return (f"on {describe_case(case)}, beyond DeepSeek-V4's configurations "
                f"({'; '.join(beyond)}): raise NotImplementedError to decline it")
    return f"on {describe_case(case)}, a DeepSeek-V4 configuration"
