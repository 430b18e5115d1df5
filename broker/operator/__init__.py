"""The operator channel: a dashboard attaches to a broker that runs without it.

wire.py    the JSON-lines protocol, events and snapshots encoded field by field
server.py  the broker's side: state/operator.sock (0600, same user only)
client.py  the dashboard's side: RemoteEngine, the engine's façade over the socket
"""
