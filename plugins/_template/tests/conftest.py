# vhost-core's pytest fixtures (vhost_daemon, guest_memory, ...), which the conformance
# suite uses.  They are opt-in: installing vhost-core does not load them into every
# pytest run on the machine.
pytest_plugins = ["vhost_core.testing.pytest_plugin"]
