"""Performance model, simulator and what-if analysis of vLLM replicas (the tuner's evidence)."""
