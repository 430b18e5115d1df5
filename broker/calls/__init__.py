"""The call path: who is calling, may they, and the call itself.

    server -> identity -> (policy) -> approvals -> forward/workers -> transport

The engine (broker/engine.py) strings these together for each call.
"""
