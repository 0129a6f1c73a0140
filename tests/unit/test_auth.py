"""API keys (router.auth): the bearer check, reading a key, the config that holds it, and the
flags and spec fields that supply it. Pure: no server (tests/cluster/test_api_keys.py has one)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from router.auth import (
    INVALID_KEY,
    MISSING_KEY,
    ApiKeyError,
    ApiKeyInterceptor,
    authorized,
    load_api_key,
)
from router.config import RouterConfig, RouterConfigError
from tandem.cluster import ClusterConfig
from tandem.serve import ServeError, ServeOptions, serve_api_key, serve_config
from tandem.spec import parse_spec
from tandem.spec_errors import SpecError

KEY = "tk-0123456789abcdef-XYZ"
OTHER = "tk-0123456789abcdef-XYW"  # same length, one character off


# -- authorized() --------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "", "Bearer whatever", "garbage"])
def test_auth_off_lets_everything_in(header: str | None) -> None:
    assert authorized(header, None)


@pytest.mark.parametrize("header", [f"Bearer {KEY}", f"bearer {KEY}", f"BEARER {KEY}"])
def test_the_key_with_a_bearer_scheme_in_any_case_is_authorized(header: str) -> None:
    assert authorized(header, KEY)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        KEY,  # no scheme
        f"Bearer  {KEY}",  # two spaces
        f"Bearer\t{KEY}",
        f" Bearer {KEY}",
        f"Bearer {KEY} ",
        f"Basic {KEY}",
        f"Bearer{KEY}",
        "Bearer ",
        "Bearer",
        f"Bearer {OTHER}",
        f"Bearer {KEY[:-1]}",  # a prefix of the key
        f"Bearer {KEY}x",  # the key and more
        "Bearer tk-é-not-ascii-and-long",
    ],
)
def test_anything_else_is_refused(header: str | None) -> None:
    assert not authorized(header, KEY)


# -- the interceptor's decision ----------------------------------------------------------------


def test_interceptor_refusals_name_missing_and_invalid_keys() -> None:
    check = ApiKeyInterceptor(KEY)
    good = (("authorization", f"Bearer {KEY}"),)
    assert check.refusal("/tandem.v1.Generation/Generate", good) is None
    assert check.refusal("/tandem.v1.Generation/Generate", ()) == MISSING_KEY
    assert check.refusal("/tandem.v1.Generation/Generate", None) == MISSING_KEY
    assert check.refusal("/x.Y/Z", (("authorization", f"Bearer {OTHER}"),)) == INVALID_KEY
    assert check.refusal("/x.Y/Z", (("other", f"Bearer {KEY}"),)) == MISSING_KEY
    twice = good + (("authorization", f"Bearer {OTHER}"),)
    assert check.refusal("/tandem.v1.Generation/Abort", twice) == INVALID_KEY
    assert check.refusal("/tandem.v1.Generation/Abort", (("authorization", b"x"),)) == INVALID_KEY
    assert check.refusal("/grpc.health.v1.Health/Check", ()) is None
    assert check.refusal("/grpc.health.v1.Health/Watch", None) is None
    reflection = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    assert check.refusal(reflection, ()) == MISSING_KEY


def test_interceptor_refuses_a_weak_key_without_quoting_it() -> None:
    with pytest.raises(ApiKeyError) as err:
        ApiKeyInterceptor("short")
    assert err.value.option == "api_key" and "short" not in str(err.value)


# -- load_api_key() ------------------------------------------------------------------------------


def _key_file(tmp_path: Path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "key"
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def test_no_source_means_no_key() -> None:
    assert load_api_key(None, None, None) is None


def test_a_literal_key() -> None:
    assert load_api_key(KEY, None, None) == KEY


def test_a_file_is_read_and_stripped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "router.auth"):
        assert load_api_key(None, _key_file(tmp_path, f"  {KEY}\n"), None) == KEY
    assert not caplog.records


def test_a_file_others_can_read_is_used_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _key_file(tmp_path, KEY, mode=0o644)
    with caplog.at_level(logging.WARNING, "router.auth"):
        assert load_api_key(None, path, None) == KEY
    assert "chmod 600" in caplog.text and KEY not in caplog.text


def test_an_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_TANDEM_KEY", KEY + "\n")
    assert load_api_key(None, None, "MY_TANDEM_KEY") == KEY


@pytest.mark.parametrize(
    ("value", "file_text", "env", "option", "reason"),
    [
        ("too-short", None, None, "api_key", "at least 16 characters"),
        ("has a space in the middle!", None, None, "api_key", "printable ASCII"),
        (None, "  \n", None, "api_key_file", "is empty"),
        (None, "two words-0123456789", None, "api_key_file", "printable ASCII"),
        (None, "line-one-0123456789\nline-two", None, "api_key_file", "printable ASCII"),
        (None, None, "TANDEM_TEST_UNSET_KEY", "api_key_env", "is not set"),
        (None, None, "TANDEM_TEST_EMPTY_KEY", "api_key_env", "is empty"),
        (KEY, None, "TANDEM_TEST_EMPTY_KEY", "api_key_env", "give one source"),
    ],
)
def test_bad_sources_raise_naming_the_option(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    value: str | None,
    file_text: str | None,
    env: str | None,
    option: str,
    reason: str,
) -> None:
    monkeypatch.delenv("TANDEM_TEST_UNSET_KEY", raising=False)
    monkeypatch.setenv("TANDEM_TEST_EMPTY_KEY", "")
    path = None if file_text is None else _key_file(tmp_path, file_text)
    with pytest.raises(ApiKeyError) as err:
        load_api_key(value, path, env)
    assert err.value.option == option and reason in err.value.reason
    for secret in (value, file_text):
        assert not (secret and secret.strip()) or secret.strip() not in str(err.value)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ApiKeyError, match=r"^api_key_file: cannot read .*nope"):
        load_api_key(None, str(tmp_path / "nope"), None)


def test_a_file_and_a_variable_are_one_source_too_many(tmp_path: Path) -> None:
    with pytest.raises(ApiKeyError, match="api_key_env: give one source"):
        load_api_key(None, _key_file(tmp_path, KEY), "TANDEM_API_KEY")


# -- RouterConfig.api_key --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["", "x" * 15, "sixteen chars ok", "tk-0123456789abcdé", "tab\t0123456789abcdef"]
)
def test_router_config_refuses_weak_keys_without_quoting_them(key: str) -> None:
    with pytest.raises(RouterConfigError) as err:
        RouterConfig(max_model_len=64, api_key=key)
    assert err.value.field == "api_key"
    assert not key or key not in str(err.value)


def test_router_config_never_shows_its_key() -> None:
    config = RouterConfig(max_model_len=64, api_key=KEY)
    assert config.api_key == KEY
    assert KEY not in repr(config) and KEY not in str(config) and "api_key" not in repr(config)


# -- `tandem serve` flags -> ClusterConfig -------------------------------------------------------


def test_serve_reads_tandem_api_key_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_API_KEY", KEY)
    config = serve_config(ServeOptions(device="cpu"), num_gpus=0)
    assert config.api_key == KEY and KEY not in repr(config)
    monkeypatch.delenv("TANDEM_API_KEY")
    assert serve_config(ServeOptions(device="cpu"), num_gpus=0).api_key is None


def test_serve_flags_win_over_the_default_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TANDEM_API_KEY", OTHER)
    assert serve_api_key(ServeOptions(api_key_file=_key_file(tmp_path, KEY))) == KEY
    monkeypatch.setenv("SERVE_KEY", KEY)
    assert serve_api_key(ServeOptions(api_key_env="SERVE_KEY")) == KEY
    options = ServeOptions(api_key=KEY)
    assert serve_api_key(options) == KEY and KEY not in repr(options)


def test_serve_errors_name_the_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ServeError) as err:
        serve_api_key(ServeOptions(api_key="short"))
    assert err.value.field == "--api-key"
    with pytest.raises(ServeError) as err:
        serve_api_key(ServeOptions(api_key=KEY, api_key_file=_key_file(tmp_path, KEY)))
    assert err.value.field == "--api-key-file"
    monkeypatch.setenv("TANDEM_API_KEY", "short")
    with pytest.raises(ServeError) as err:
        serve_api_key(ServeOptions())
    assert err.value.field == "TANDEM_API_KEY" and "short" not in str(err.value)


def test_cluster_config_never_shows_its_key() -> None:
    assert KEY not in repr(ClusterConfig(api_key=KEY))


# -- the cluster spec ----------------------------------------------------------------------------

SPEC = {
    "model": {"path": "tiny-random"},
    "node_types": {"cpu": {"gpus": 0}},
    "pools": {"colocated": {"node_type": "cpu", "num_workers": 1, "device": "cpu"}},
}


def test_spec_takes_a_key_file_or_variable() -> None:
    assert (
        parse_spec({**SPEC, "router": {"api_key_file": "/etc/k"}}).router.api_key_file == "/etc/k"
    )
    assert parse_spec({**SPEC, "router": {"api_key_env": "K_1"}}).router.api_key_env == "K_1"
    assert parse_spec(SPEC).router.api_key_env is None


@pytest.mark.parametrize(
    ("router", "field"),
    [
        ({"api_key": KEY}, "router.api_key"),
        ({"api_key_file": "/k", "api_key_env": "K"}, "router.api_key_env"),
        ({"api_key_env": "not-a-name"}, "router.api_key_env"),
        ({"api_key_file": ""}, "router.api_key_file"),
    ],
)
def test_spec_refuses_literal_keys_and_bad_sources(router: dict[str, str], field: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec({**SPEC, "router": router})
    assert err.value.field == field and KEY not in str(err.value)
