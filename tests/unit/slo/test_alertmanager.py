"""The Alertmanager structure: pages and tickets routed apart; a page inhibits only the ticket of its own SLO."""

from __future__ import annotations

from controlplane import names
from controlplane.slo.alertmanager import RECEIVER_PAGE, RECEIVER_TICKET, alertmanager_config
from controlplane.slo.options import RuleOptions


def test_pages_and_tickets_go_to_their_own_receivers() -> None:
    routes = alertmanager_config()["route"]["routes"]
    assert [(r["matchers"], r["receiver"]) for r in routes] == [
        (['severity="page"'], RECEIVER_PAGE), (['severity="ticket"'], RECEIVER_TICKET)]


def test_a_burning_page_inhibits_the_ticket_of_the_same_slo_by_name_not_by_severity() -> None:
    rule = alertmanager_config()["inhibit_rules"][0]
    assert rule == {"source_matchers": [f'alertname="{names.ALERT_SLO_BURN_PAGE}"'],
                    "target_matchers": [f'alertname="{names.ALERT_SLO_BURN_TICKET}"'],
                    "equal": ["slo", "deployment"]}


def test_webhooks_are_configured_only_when_given() -> None:
    receivers = alertmanager_config(RuleOptions(page_webhook_url="http://pager/hook"))["receivers"]
    assert receivers[1] == {"name": RECEIVER_PAGE,
                            "webhook_configs": [{"url": "http://pager/hook", "send_resolved": True}]}
    assert receivers[2] == {"name": RECEIVER_TICKET}
