"""Tamper-evident audit log: hash-chained JSON lines in daily files (DESIGN §6).

Four rooms, each depending only on the ones before it:

- :mod:`~broker.audit.chain`: the record format. Canonical JSON, the hash that
  chains each record to the one before it, cleaning and sealing a record, ids
  and timestamps, checking one line on its own. Pure, no I/O.
- :mod:`~broker.audit.store`: the files. Day files, the head file, directory
  creation and fsync, and crash recovery (a torn tail is set aside, not lost).
- :mod:`~broker.audit.log`: the writer, :class:`AuditLog`, with group commit;
  :class:`~broker.audit.log.FsyncPlacement` decides whether an fsync runs on
  the event loop or the audit thread.
- :mod:`~broker.audit.read`: verify the chain, iterate, tail and follow; safe
  while the broker writes.
- :mod:`~broker.audit.keys`: the HMAC key and the head kept in the OS keyring.

This package re-exports the public names. The tuning constants and the
functions tests patch (``LAZY_SYNC_SECONDS``, ``_datasync``, ...) are not
re-exported: patch them on the module that uses them.
"""

from __future__ import annotations

from broker.audit.chain import GENESIS, HMAC_CHAIN, AuditKey, KeyNeeded, canonical_json, format_ts, record_hash
from broker.audit.log import AuditLog, AuditStats
from broker.audit.read import BadRecord, VerifyResult, follow, iter_records, last_records, verify
from broker.audit.store import AuditError, Head, TornTail, day_file_name, list_torn_tails

__all__ = [
    "GENESIS",
    "HMAC_CHAIN",
    "AuditError",
    "AuditKey",
    "AuditLog",
    "AuditStats",
    "BadRecord",
    "Head",
    "KeyNeeded",
    "TornTail",
    "VerifyResult",
    "canonical_json",
    "day_file_name",
    "follow",
    "format_ts",
    "iter_records",
    "last_records",
    "list_torn_tails",
    "record_hash",
    "verify",
]
