"""Outloop engine: headless broker, audit, leak watcher. Never imports textual."""

__version__ = "0.1.0"
