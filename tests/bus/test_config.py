"""Configuration: defaults, TOML, environment, and rejection of bad keys and values."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from eventbus import BatchPolicy, BreakerPolicy, BusConfig, ConfigError, RetryPolicy


def test_defaults_are_valid_and_documented_values() -> None:
    config = BusConfig()
    assert config.durability == "normal"
    assert config.max_event_bytes == 1024 * 1024
    assert config.batch == BatchPolicy()
    assert config.batch.mode == "adaptive"


def test_toml_reads_top_level_keys_and_nested_tables(tmp_path: Path) -> None:
    path = tmp_path / "bus.toml"
    path.write_text(
        'durability = "full"\nchannel_capacity = 256\n'
        '[batch]\nmode = "aimd"\nmax_size = 64\n[retry]\nmax_attempts = 7\n'
    )
    config = BusConfig.from_toml(path)
    assert config.durability == "full"
    assert config.channel_capacity == 256
    assert config.batch == BatchPolicy(mode="aimd", max_size=64)
    assert config.retry.max_attempts == 7


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("durabilty = 'full'\n", "durabilty"),
        ("[batch]\nmax_sise = 3\n", "batch.max_sise"),
        ("[batch]\nmin_size = 10\nmax_size = 5\n", "batch.max_size"),
        ("[batch]\ntarget_latency = -1.0\n", "batch.target_latency"),
        ("[retry]\nmax_attempts = 0\n", "retry.max_attempts"),
        ("max_pending_publishes = 0\n", "max_pending_publishes"),
        ("durability = 'sometimes'\n", "durability"),
    ],
)
def test_unknown_keys_and_impossible_values_name_the_key(
    tmp_path: Path, text: str, key: str
) -> None:
    path = tmp_path / "bus.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        BusConfig.from_toml(path)
    assert info.value.key == key
    assert key in str(info.value)


def test_a_missing_or_malformed_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such"):
        BusConfig.from_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("durability = \n")
    with pytest.raises(ConfigError, match="TOML"):
        BusConfig.from_toml(bad)


def test_environment_variables_configure_nested_settings() -> None:
    env = {
        "EVENTBUS_DURABILITY": "off",
        "EVENTBUS_BATCH__MAX_SIZE": "32",
        "EVENTBUS_RETRY__TIMEOUT": "2.5",
        "PATH": "/usr/bin",
    }
    config = BusConfig.from_env(env)
    assert config.durability == "off"
    assert config.batch.max_size == 32
    assert config.retry.timeout == 2.5


def test_an_unknown_environment_variable_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"batch\.size"):
        BusConfig.from_env({"EVENTBUS_BATCH__SIZE": "3"})


def test_policies_reject_impossible_values_directly() -> None:
    with pytest.raises(ConfigError, match=r"retry\.max_delay"):
        RetryPolicy(initial_delay=5, max_delay=1)
    with pytest.raises(ConfigError, match=r"retry\.multiplier"):
        RetryPolicy(multiplier=float("nan"))
    with pytest.raises(ConfigError, match=r"batch\.max_wait"):
        BatchPolicy(max_wait=float("inf"))


@pytest.mark.parametrize(
    ("build", "key", "message"),
    [
        (lambda: BusConfig(durability="fast"), "durability", "one of 'normal'"),
        (lambda: BusConfig(channel_capacity="10"), "channel_capacity", "expected int, got str"),
        (lambda: BusConfig(max_event_bytes=True), "max_event_bytes", "got bool"),
        (lambda: BusConfig(retention=None), "retention", "expected float"),
        (lambda: BusConfig(batch={"mode": "natural"}), "batch", "expected BatchPolicy"),
        (lambda: BusConfig(breaker=3), "breaker", "BreakerPolicy | None"),
        (lambda: RetryPolicy(jitter="weird"), "retry.jitter", "one of 'full'"),
        (lambda: RetryPolicy(timeout="1"), "retry.timeout", "float | None"),
        (lambda: RetryPolicy(retry_on=[ValueError]), "retry.retry_on", "expected tuple"),
        (lambda: BatchPolicy(mode="turbo"), "batch.mode", "one of 'adaptive'"),
        (lambda: BatchPolicy(max_size=2.5), "batch.max_size", "expected int"),
        (lambda: BreakerPolicy(failure_ratio="0.5"), "breaker.failure_ratio", "got str"),
    ],
)
def test_constructors_reject_wrong_types_and_values_naming_the_key(
    build: Callable[[], object], key: str, message: str
) -> None:
    # Regression: msgspec Structs do not check types when built directly, so these
    # passed construction and then fell back silently or failed later with a raw
    # KeyError or TypeError.
    with pytest.raises(ConfigError) as info:
        build()
    assert info.value.key == key
    assert message in str(info.value)


def test_constructors_accept_an_int_for_a_float_and_none_where_allowed() -> None:
    assert BusConfig(retention=10).retention == 10
    assert BusConfig(breaker=None).breaker is None
    assert RetryPolicy(timeout=None, retry_on=(ValueError,)).retry_on == (ValueError,)


def test_a_choice_built_at_run_time_is_accepted() -> None:
    # Regression: a string equal to one of a Literal's choices but not the very same
    # object (read from argv, the environment or a file, or built by joining) was
    # refused as "expected one of 'normal', ..., got str 'normal'".
    durability = "".join(["nor", "mal"])
    mode = "".join(["fix", "ed"])
    assert BusConfig(durability=durability).durability == "normal"
    assert BatchPolicy(mode=mode).mode == "fixed"
    with pytest.raises(ConfigError, match="one of 'normal'"):
        BusConfig(durability="".join(["nor", "mel"]))
