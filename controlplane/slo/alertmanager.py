"""Alertmanager configuration for the rendered alerts (pure: returns the structure; render.py writes it).

Pages and tickets go to different receivers. A burning page of an SLO inhibits the ticket of the same SLO
(`equal: [slo, deployment]`); the matchers name the burn alerts explicitly, because `equal` on a label that both
alerts lack counts as equal and would let any page silence every operational ticket.
"""

from __future__ import annotations

from typing import Any

from controlplane import names
from controlplane.slo.options import RuleOptions

RECEIVER_DEFAULT = "controlplane-default"
RECEIVER_PAGE = "controlplane-page"
RECEIVER_TICKET = "controlplane-ticket"


def _receiver(name: str, url: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name}
    if url:
        out["webhook_configs"] = [{"url": url, "send_resolved": True}]
    return out


def alertmanager_config(options: RuleOptions | None = None) -> dict[str, Any]:
    o = options or RuleOptions()
    return {
        "route": {
            "receiver": RECEIVER_DEFAULT,
            "group_by": ["alertname", names.LABEL_DEPLOYMENT, names.LABEL_SLO],
            "group_wait": "30s",
            "group_interval": "5m",
            "repeat_interval": "12h",
            "routes": [
                {"receiver": RECEIVER_PAGE, "matchers": [f'{names.LABEL_SEVERITY}="page"'],
                 "group_wait": "10s", "repeat_interval": "1h"},
                {"receiver": RECEIVER_TICKET, "matchers": [f'{names.LABEL_SEVERITY}="ticket"'],
                 "repeat_interval": "24h"},
            ],
        },
        "inhibit_rules": [
            {
                "source_matchers": [f'alertname="{names.ALERT_SLO_BURN_PAGE}"'],
                "target_matchers": [f'alertname="{names.ALERT_SLO_BURN_TICKET}"'],
                "equal": [names.LABEL_SLO, names.LABEL_DEPLOYMENT],
            },
            {   # a deployment with no ready replica explains its replicas' down / crash-loop tickets
                "source_matchers": [f'alertname="{names.ALERT_DEPLOYMENT_DOWN}"'],
                "target_matchers": [f'alertname=~"{names.ALERT_REPLICA_DOWN}|{names.ALERT_CRASHLOOP}"'],
                "equal": [names.LABEL_DEPLOYMENT],
            },
        ],
        "receivers": [
            _receiver(RECEIVER_DEFAULT, None),
            _receiver(RECEIVER_PAGE, o.page_webhook_url),
            _receiver(RECEIVER_TICKET, o.ticket_webhook_url),
        ],
    }
