"""Secrets: the masked type, and the store against the session's private keyring."""

from __future__ import annotations

import copy
import logging
import pickle

import keyring
import keyring.backends.fail
import pytest

from broker.secrets import (
    SERVICE,
    Secret,
    SecretStore,
    SecretStoreError,
    backend_info,
    username,
)

VALUE = "sk-live-4f9a0c7e1b2d3a6f"


# -- Secret --------------------------------------------------------------------------


def test_secret_never_shows_itself() -> None:
    s = Secret(VALUE)
    shown = [
        repr(s),
        str(s),
        f"{s}",
        f"{s!r}",
        "%s" % s,  # noqa: UP031 - old-style formatting is what log calls use
        format(s, ""),
        repr([s]),
        repr({"k": s}),
        str((s,)),
    ]
    for text in shown:
        assert VALUE not in text
        assert "sk-" not in text
    assert s.reveal() == VALUE


def test_secret_is_masked_in_log_records(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        logging.getLogger("t").info("using %s for %r", Secret(VALUE), Secret(VALUE))
    assert VALUE not in caplog.text


def test_secret_is_masked_in_exception_messages() -> None:
    with pytest.raises(ValueError) as info:
        raise ValueError(f"bad key {Secret(VALUE)}")
    assert VALUE not in str(info.value)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_secret_cannot_be_pickled(protocol: int) -> None:
    with pytest.raises(TypeError):
        pickle.dumps(Secret(VALUE), protocol=protocol)


def test_secret_cannot_be_copied_out_through_copy() -> None:
    # copy goes through the same reduce hook as pickle
    with pytest.raises(TypeError):
        copy.deepcopy(Secret(VALUE))


def test_secret_has_no_instance_dict() -> None:
    # vars() would otherwise show the value
    with pytest.raises(TypeError):
        vars(Secret(VALUE))


def test_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError):
        Secret("")


def test_secrets_compare_by_value() -> None:
    assert Secret(VALUE) == Secret(VALUE)
    assert Secret(VALUE) != Secret(VALUE + "x")
    assert Secret(VALUE) != VALUE  # never equal to the bare string
    assert len({Secret(VALUE), Secret(VALUE)}) == 1


# -- SecretStore against the real (private) keyring ---------------------------------


def test_set_get_delete_round_trip() -> None:
    store = SecretStore()
    store.set("acme", "github", Secret(VALUE))
    assert keyring.get_password(SERVICE, "acme/github") == VALUE
    assert SecretStore().get("acme", "github") == Secret(VALUE)  # a fresh store reads it
    assert store.delete("acme", "github") is True
    assert keyring.get_password(SERVICE, "acme/github") is None
    assert SecretStore().get("acme", "github") is None
    assert store.get("acme", "github") is None
    assert store.delete("acme", "github") is False


def test_username_is_tenant_slash_credential() -> None:
    assert username("acme", "github") == "acme/github"
    SecretStore().set("acme", "github", Secret(VALUE))
    assert keyring.get_password("outloop", "acme/github") == VALUE
    assert keyring.get_password("outloop", "acme") is None
    assert keyring.get_password("acme", "github") is None


def test_tenants_do_not_share_secrets() -> None:
    store = SecretStore()
    store.set("acme", "github", Secret(VALUE))
    store.set("beta", "github", Secret(VALUE + "-beta"))
    assert SecretStore().get("acme", "github") == Secret(VALUE)
    assert SecretStore().get("beta", "github") == Secret(VALUE + "-beta")
    store.delete("beta", "github")
    assert SecretStore().get("acme", "github") == Secret(VALUE)


def test_reads_are_cached_until_forgotten() -> None:
    store = SecretStore()
    keyring.set_password(SERVICE, "acme/github", VALUE)
    assert store.get("acme", "github") == Secret(VALUE)
    keyring.set_password(SERVICE, "acme/github", "rotated-value")
    assert store.get("acme", "github") == Secret(VALUE)  # served from memory
    store.forget()
    assert store.get("acme", "github") == Secret("rotated-value")


def test_store_writes_update_its_cache() -> None:
    store = SecretStore()
    assert store.get("acme", "github") is None
    store.set("acme", "github", Secret(VALUE))
    assert store.get("acme", "github") == Secret(VALUE)
    store.delete("acme", "github")
    keyring.set_password(SERVICE, "acme/github", "other")
    assert store.get("acme", "github") == Secret("other")  # delete dropped the cache entry


def test_managed_returns_the_secrets_present() -> None:
    store = SecretStore()
    store.set("acme", "github", Secret(VALUE))
    found = SecretStore().managed([("acme", "github"), ("acme", "missing")])
    assert found == {("acme", "github"): Secret(VALUE)}


def test_unusable_keyring_is_a_clear_error_without_the_secret() -> None:
    store = SecretStore(keyring.backends.fail.Keyring())
    with pytest.raises(SecretStoreError) as info:
        store.set("acme", "github", Secret(VALUE))
    assert VALUE not in str(info.value)
    assert "doctor" in str(info.value)
    with pytest.raises(SecretStoreError):
        store.get("acme", "github")


def test_backend_info_names_the_backend_in_use() -> None:
    info = backend_info()
    kr = keyring.get_keyring()
    assert info.usable
    assert info.name.endswith(type(kr).__qualname__)
    assert info.advice == ""


def test_backend_info_says_what_to_do_without_a_usable_backend() -> None:
    info = backend_info(keyring.backends.fail.Keyring())
    assert not info.usable
    assert "fail" in info.name
    assert "no usable keyring backend" in info.advice
    assert "gnome-keyring" in info.advice
