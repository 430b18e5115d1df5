"""Outloop dashboard and command line."""
