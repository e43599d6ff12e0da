"""Ports for the tests that start real listeners (the application, the admin page, redis-server)."""

import socket


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: the system picks one, the probe lets it go.

    Another process could take it before the test binds it; with ports picked from the whole
    ephemeral range that is rare enough for tests, and it also serves as a port known to be closed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
