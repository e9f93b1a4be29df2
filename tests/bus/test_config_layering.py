"""Configuration in layers: a TOML file, the environment over it, and per-subscription
changes over both."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from eventbus import (
    BatchPolicy,
    BreakerPolicy,
    Bus,
    BusConfig,
    ConfigError,
    Context,
    Event,
    RetryPolicy,
)
from eventbus._config import merge_policy, subscription_policies

FILE = """
durability = "full"
channel_capacity = 256
[retry]
max_attempts = 7
initial_delay = 0.5
max_delay = 60.0
[batch]
max_size = 64
"""


@pytest.fixture
def toml(tmp_path: Path) -> Path:
    path = tmp_path / "bus.toml"
    path.write_text(FILE)
    return path


def test_the_environment_overrides_the_file_key_by_key(toml: Path) -> None:
    # Regression: a config came from the file or from the environment, never both.
    env = {
        "EVENTBUS_DURABILITY": "normal",
        "EVENTBUS_RETRY__MAX_DELAY": "90",
        "EVENTBUS_BATCH__MODE": "aimd",
        "HOME": "/root",
    }
    config = BusConfig.load(toml, environ=env)
    assert config.durability == "normal"  # the environment's
    assert config.channel_capacity == 256  # the file's
    assert config.retry == RetryPolicy(max_attempts=7, initial_delay=0.5, max_delay=90.0)
    assert config.batch == BatchPolicy(mode="aimd", max_size=64)


def test_load_reads_either_source_alone(toml: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert BusConfig.load(toml, environ={}) == BusConfig.from_toml(toml)
    for name in [n for n in os.environ if n.upper().startswith("EVENTBUS_")]:
        monkeypatch.delenv(name)  # the outer environment is not this test's layer
    monkeypatch.setenv("EVENTBUS_CHANNEL_CAPACITY", "128")
    assert BusConfig.load().channel_capacity == 128  # os.environ by default
    assert BusConfig.load(toml).channel_capacity == 128
    assert BusConfig.load(environ={"EVENTBUS_BREAKER": "none"}).breaker is None


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"EVENTBUS_RETRY__MAX_ATEMPTS": "3"}, "retry.max_atempts"),
        ({"EVENTBUS_RETRY__INITIAL_DELAY": "120"}, "retry.max_delay"),  # past the file's cap
        ({"EVENTBUS_CHANNEL_CAPACITY": "many"}, "channel_capacity"),
    ],
)
def test_a_bad_layer_is_a_config_error_naming_the_key(
    toml: Path, env: dict[str, str], key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        BusConfig.load(toml, environ=env)
    assert info.value.key == key


def test_a_policy_object_is_whole_and_a_dict_changes_the_bus_default() -> None:
    base = RetryPolicy(max_attempts=7, initial_delay=0.5, max_delay=60.0)
    # Regression: RetryPolicy(max_attempts=3) silently dropped the file's other
    # [retry] values; a dict now changes only what it names.
    assert merge_policy({"max_attempts": 3}, base, "retry") == RetryPolicy(
        max_attempts=3, initial_delay=0.5, max_delay=60.0
    )
    whole = RetryPolicy(max_attempts=3)
    assert merge_policy(whole, base, "retry") is whole
    assert merge_policy(None, base, "retry") is base


@pytest.mark.parametrize(
    ("value", "key", "words"),
    [
        ({"max_atempts": 3}, "retry.max_atempts", "unknown setting; see RetryPolicy"),
        ({"max_attempts": 0}, "retry.max_attempts", "at least 1"),
        ({"max_attempts": "3"}, "retry.max_attempts", "Expected `int`"),
        (5, "retry", "must be a RetryPolicy, a dict"),
        (BatchPolicy(), "retry", "got BatchPolicy"),
    ],
)
def test_a_wrong_retry_override_is_a_config_error(value: object, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        merge_policy(value, RetryPolicy(), "retry")  # type: ignore[arg-type]
    assert info.value.key == key
    assert words in str(info.value)


@pytest.mark.anyio
async def test_subscribe_takes_a_dict_as_changes_to_the_bus_policy() -> None:
    # Regression: a plain dict for retry= failed later, inside dispatch, with
    # AttributeError.
    quick = RetryPolicy(max_attempts=7, initial_delay=0.001, max_delay=0.002)
    async with Bus.open(":memory:", config=BusConfig(retry=quick, breaker=None)) as bus:

        @bus.subscribe("orders", name="billing", retry={"max_attempts": 2}, batch={"max_size": 8})
        async def bill(event: Event[int], ctx: Context) -> None:
            raise ValueError("always")

        await bus.publish("orders", 1)
        await bus.drain(timeout=10)
        (letter,) = await bus.dead_letters.list()
        assert letter.attempts == 2

        with pytest.raises(ConfigError, match=r"retry\.max_atempts"):
            bus.subscribe("orders", name="audit", retry={"max_atempts": 2})
        with pytest.raises(ConfigError, match="must be a BatchPolicy"):
            bus.subscribe("orders", name="audit", batch=[("max_size", 3)])  # type: ignore[arg-type]


def test_subscription_policies_combine_the_arguments_with_the_config() -> None:
    config = BusConfig(retry=RetryPolicy(max_attempts=7, initial_delay=0.5))
    batch, retry, breaker = subscription_policies(config, None, {"max_attempts": 2}, None)
    assert batch is config.batch
    assert retry == RetryPolicy(max_attempts=2, initial_delay=0.5)
    assert breaker is None
    _, _, default = subscription_policies(config, None, None, "default")
    assert default is config.breaker
    off = BusConfig(breaker=None)
    _, _, changed = subscription_policies(off, None, None, {"cooldown": 1.0})
    assert changed == BreakerPolicy(cooldown=1.0)


def test_a_breaker_dict_changes_the_default_breaker() -> None:
    assert merge_policy({"cooldown": 1.0}, BreakerPolicy(), "breaker") == BreakerPolicy(
        cooldown=1.0
    )
