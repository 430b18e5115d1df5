"""What the tests share: a world of two tenants and a running broker (fixtures), a real
HTTP upstream on loopback (upstream), the dashboard's fixed sample data (tui_sample),
and the file keyring used where no Secret Service can be started (isolated_keyring)."""
