"""The Streamlit app: fleet, SLOs, latency phases, KV cache, GPU, cost, recommendations and history,
read only through the plane's REST API (`dashboards/app.py` is its entry script)."""
