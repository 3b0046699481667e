"""The edge: the `orchestrator` command line, the demo, the supervisor of stage processes, the
embedded nats-server and the process entry points. Only this package reads the environment
and the pipeline file (shared.app.load) and knows the default graph (services.DEFAULT_GRAPH);
it hands settings down to the library."""
