"""The real promtool for the PromQL parse test: the same session fixture as the alert-rule tool tests."""

from tests.tools.conftest import prometheus_tools  # noqa: F401 - a pytest fixture, re-exported for this directory
