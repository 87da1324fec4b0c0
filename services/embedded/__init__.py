"""The embedded one-machine stack behind `frugalmesh up`, `demo` and the tests: launchers for
nats-server, the chdb ClickHouse server and the local model engine (``servers``), the engine and
ClickHouse server processes themselves (``engine``, ``chserver``), and ``Stack``, which starts them
with the services. Nothing in a mesh service imports this package."""
