"""SLOs: the spec, Prometheus rules and alerts generated from it, and (elsewhere in the package) their evaluation."""

from controlplane.slo.spec import SpecError, load_slos

__all__ = ["SpecError", "load_slos"]
