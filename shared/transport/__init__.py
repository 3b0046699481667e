"""The transport: the only package that talks to nats-py. It knows nothing of the pipeline.

`api` holds its vocabulary (plain data and interfaces, importing nothing); `connection.Bus` is
a NATS connection, built from `admin` (streams and consumers), `publish`, `pull`, `keyvalue`
and `subscribe`; `memory.MemoryBus` behaves like it, in memory, for unit tests. This file
imports nothing, so that reading the vocabulary never loads nats-py.
"""
