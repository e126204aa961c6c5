"""vncmux: a console proxy from noVNC WebSockets to VNC servers, chosen by token.

Run it with ``twistd -n vncmux`` (see ``vncmux.tap``); manage tokens with the ``vncmux``
command (``vncmux.cli``). Importing this package installs no reactor.
"""

__version__ = "0.1.0"
