"""The stage runtime, above the transport: the consume/publish/ack loop (`loop`), the
partitions an instance owns (`affinity`), attempts that outlive consumers (`attempts`), the
built-in middleware (`tracing`, `timeouts`) and running several stages in one process
(`group`)."""
