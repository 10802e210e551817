"""Grafana dashboards generated from code (grafana-foundation-sdk) into dashboards/grafana/.

model: what a dashboard says (frozen specs); promql: queries with Grafana variables; dashboards: the five
dashboards; sdk: specs -> SDK objects -> JSON; render: files on disk and `--check`.
"""
