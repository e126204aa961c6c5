"""Suite-wide test settings: a deterministic Hypothesis profile (Twisted's own)."""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "vncmux",
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("vncmux")
