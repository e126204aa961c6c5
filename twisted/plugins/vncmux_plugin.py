"""twistd plugin: names the module that builds the service, nothing more."""

from twisted.application.service import ServiceMaker

vncmux = ServiceMaker(
    "vncmux",
    "vncmux.tap",
    "WebSocket console proxy from noVNC to VNC servers, by token",
    "vncmux",
)
