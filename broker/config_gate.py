"""The config the broker enforces: approved changes at once, edits made elsewhere only as far as they narrow.

The engine asks :class:`ConfigGate` for its config at start and whenever
config.toml changes. Content whose digest the operator approved
(broker/config_approval.py: every write of Outloop's own commands and
dashboard, and `outloop config accept`) is enforced as it is. Any other
content is reviewed against the last approved document
(broker/config_review.py): what narrows access applies at once, audited as
``config_narrowed``; what widens it is staged (``config_staged``, a
:class:`~broker.events.ConfigStaged` event, a desktop notification) and waits
for :meth:`ConfigGate.accept` or :meth:`ConfigGate.reject` (``config_accepted``,
``config_rejected``). A newer edit replaces what was staged: the newest wins.

A config.toml that disappears leaves nothing enforced (every call is
refused) until it comes back, and the approved document is kept meanwhile.
A config.toml that is a symlink is read through it, and its content reviewed
like any other: where the bytes live earns them nothing.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from typing import Any

import tomli_w

from broker import config_approval
from broker.config import Config, ConfigError, validate
from broker.config_review import review
from broker.events import ConfigRejected, ConfigStageCleared, ConfigStaged, Event
from broker.operator.notify import notify_desktop
from broker.paths import Paths, atomic_write

Record = Callable[[dict[str, Any]], None]


class ConfigGate:
    """Decides which config the broker enforces, and keeps what waits for the operator."""

    def __init__(self, paths: Paths, *, record: Record, publish: Callable[[Event], None]) -> None:
        self.paths = paths
        self._record = record  # an audit record, written soon (never blocks)
        self._publish = publish
        self._baseline: dict[str, Any] = {}  # the last approved document (narrowing applied)
        self._approved: str | None = None  # its digest as the keyring holds it
        self.staged: ConfigStaged | None = None
        self._staged_raw: dict[str, Any] | None = None
        self._missing = False

    # -- reading -----------------------------------------------------------------------

    def _read(self) -> bytes | None:
        try:
            return self.paths.config_file.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ConfigError(f"{self.paths.config_file}: cannot read ({e.strerror})") from None

    def _parse(self, data: bytes) -> tuple[dict[str, Any], Config]:
        try:
            raw = tomllib.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{self.paths.config_file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{self.paths.config_file}: {e}") from None
        return raw, validate(raw, self.paths.config_file)

    # -- the engine's side -------------------------------------------------------------------

    def start(self) -> Config:
        """The config to enforce when the broker starts; ConfigError when the file does not validate."""
        data = self._read()
        approved = config_approval.read_approved(self.paths)
        if data is None:
            data = b""
        raw, config = self._parse(data)
        digest = config_approval.digest(data)
        if approved.digest is None:
            # Nothing approved on this machine yet: the file as the operator left it is the
            # first approved config (trust on first use; README says so).
            config_approval.approve(self.paths, data)
            self._approved, self._baseline = digest, raw
            return config
        if digest == approved.digest:
            self._approved, self._baseline = digest, raw
            return config
        self._approved = approved.digest
        if approved.copy is not None:
            self._baseline, _ = self._parse(approved.copy)
        # else: the approved copy is gone or not the approved one: nothing is taken on
        # trust, and everything in the file waits for the operator.
        return self._review(data, raw)

    def consider(self) -> Config | None:
        """config.toml changed: the config to enforce now, or None to keep the current one."""
        try:
            data = self._read()
            if data is None:
                return self._gone()
            raw, config = self._parse(data)
        except ConfigError as e:
            self._publish(ConfigRejected(str(e)))
            return None
        self._missing = False
        digest = config_approval.digest(data)
        if digest != self._approved:
            # An Outloop command may have approved it a moment ago: ask the keyring.
            self._approved = config_approval.approved_digest() or self._approved
        if digest == self._approved:
            changes = review(self._baseline, raw).changes
            self._baseline = raw
            if changes:
                self._record({"event": "config_changed", "approver": "operator", "changes": [c.text for c in changes]})
            self._clear("approved")
            return config
        return self._review(data, raw)

    def _gone(self) -> Config:
        if not self._missing:
            self._missing = True
            self._record({"event": "config_missing", "path": str(self.paths.config_file)})
        self._clear("withdrawn")
        return validate({}, self.paths.config_file)

    def _review(self, data: bytes, raw: dict[str, Any]) -> Config:
        rv = review(self._baseline, raw)
        try:
            enforced = validate(rv.applied, self.paths.config_file)
        except ConfigError:
            # The narrowed document does not hold together: keep the approved one.
            rv.applied = self._baseline
            enforced = validate(self._baseline, self.paths.config_file)
        narrowing, widening = rv.narrowing, rv.widening
        if narrowing:
            self._baseline = rv.applied
            approved = tomli_w.dumps(rv.applied).encode("utf-8")
            if config_approval.approve(self.paths, approved):
                self._approved = config_approval.digest(approved)
            self._record({"event": "config_narrowed", "changes": narrowing})
        if not widening:
            self._clear("withdrawn")
            return enforced
        digest = config_approval.digest(data)
        if self.staged is not None and self.staged.digest == digest:
            return enforced
        self.staged = ConfigStaged(digest, widening, narrowing)
        self._staged_raw = raw
        self._record({"event": "config_staged", "digest": digest, "changes": widening, "applied": narrowing})
        self._publish(self.staged)
        notify_desktop(
            "Outloop: a config change waits for you",
            f"{len(widening)} change(s) to config.toml widen access: {widening[0]}. "
            "Review them in `outloop`, or run `outloop config accept` / `outloop config reject`.",
        )
        return enforced

    def _clear(self, outcome: str, approver: str = "") -> None:
        if self.staged is not None:
            self.staged = None
            self._staged_raw = None
            self._publish(ConfigStageCleared(outcome, approver))

    # -- the operator's side ---------------------------------------------------------------

    def accept(self, digest: str, approver: str) -> Config | str:
        """Enforce the staged change named by ``digest``; the new config, or why not."""
        staged = self.staged
        if staged is None or staged.digest != digest:
            return "no staged config change has that digest: it changed since, review it again"
        data = self._read()
        if data is None or config_approval.digest(data) != digest:
            return "config.toml changed since it was staged: review it again"
        raw, config = self._parse(data)
        config_approval.approve(self.paths, data)
        self._approved, self._baseline = digest, raw
        self._record({"event": "config_accepted", "digest": digest, "changes": staged.changes, "approver": approver})
        self._clear("accepted", approver)
        return config

    def reject(self, digest: str, approver: str) -> Config | str:
        """Discard the staged change: config.toml goes back to what is enforced; the config, or why not."""
        staged = self.staged
        if staged is None or staged.digest != digest:
            return "no staged config change has that digest: it changed since, review it again"
        data = tomli_w.dumps(self._baseline).encode("utf-8")
        config = validate(self._baseline, self.paths.config_file)
        config_approval.approve(self.paths, data)
        atomic_write(self.paths.config_file, data)
        self._approved = config_approval.digest(data)
        self._record({"event": "config_rejected", "digest": digest, "changes": staged.changes, "approver": approver})
        self._clear("rejected", approver)
        return config
