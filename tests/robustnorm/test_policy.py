"""Policy strings: parsing, canonical forms, resolution per group size, clear errors."""

from __future__ import annotations

import pytest

from robustnorm import parse_policy


@pytest.mark.parametrize("text, canonical", [
    ("frozen", "frozen"), ("batch", "batch"), (" Batch ", "batch"), ("blend:16", "blend:16"),
    ("blend:2.5", "blend:2.5"), ("adaptive:16", "adaptive:16"), ("adaptive:8:frozen", "adaptive:8:frozen"),
    ("adaptive:8:blend:32", "adaptive:8:blend:32"),
])
def test_round_trip(text: str, canonical: str) -> None:
    policy = parse_policy(text)
    assert str(policy) == canonical
    assert parse_policy(str(policy)) == policy


@pytest.mark.parametrize("text", [
    "", "eval", "frozen:1", "batch:3", "blend", "blend:0", "blend:-1", "blend:x", "blend:inf", "adaptive",
    "adaptive:0", "adaptive:x", "adaptive:4:batch", "adaptive:4:blend", "adaptive:4:blend:0", "adaptive:4:frozen:1",
])
def test_malformed_policies_name_the_valid_forms(text: str) -> None:
    with pytest.raises(ValueError, match="valid forms are"):
        parse_policy(text)


def test_adaptive_resolution_and_default_fallbacks() -> None:
    policy = parse_policy("adaptive:16")
    assert str(policy.resolve(16, robust=False)) == "batch"
    assert str(policy.resolve(15, robust=False)) == "blend:16"
    assert str(policy.resolve(15, robust=True)) == "frozen"
    explicit = parse_policy("adaptive:16:blend:64")
    assert str(explicit.resolve(1, robust=True)) == "blend:64"
    assert str(parse_policy("blend:4").resolve(1000, robust=False)) == "blend:4"


def test_non_string_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        parse_policy(16)  # type: ignore[arg-type]
