"""A keyring backend kept in one JSON file under OUTLOOP_TEST_KEYRING_DIR.

Used only when the test machine has no D-Bus / gnome-keyring to run a private
Secret Service; it keeps tests away from the developer's own keychain.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from keyring.backend import KeyringBackend
from keyring.errors import PasswordDeleteError


class IsolatedKeyring(KeyringBackend):
    priority = 1  # type: ignore[assignment]

    @property
    def _file(self) -> Path:
        root = Path(os.environ["OUTLOOP_TEST_KEYRING_DIR"])
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        return root / "keyring.json"

    def _load(self) -> dict[str, str]:
        try:
            return json.loads(self._file.read_text())
        except FileNotFoundError:
            return {}

    def _save(self, data: dict[str, str]) -> None:
        self._file.write_text(json.dumps(data))
        self._file.chmod(0o600)

    def get_password(self, service: str, username: str) -> str | None:
        return self._load().get(f"{service}\0{username}")

    def set_password(self, service: str, username: str, password: str) -> None:
        data = self._load()
        data[f"{service}\0{username}"] = password
        self._save(data)

    def delete_password(self, service: str, username: str) -> None:
        data = self._load()
        if data.pop(f"{service}\0{username}", None) is None:
            raise PasswordDeleteError(username)
        self._save(data)

    def clear(self) -> None:
        self._save({})
