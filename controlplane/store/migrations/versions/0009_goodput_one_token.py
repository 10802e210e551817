"""SLO rollups start over: a TPOT / ITL target is met by an answer of one token, a TTFT one missed by a request
that ended with no token after its threshold

Such an answer has no inter-token latency (its TPOT is NULL by definition); the rollups counted it unknown,
so it counted only when another target missed. A request aborted before any token (an overload, a client timeout)
has no TTFT either, yet waited its whole e2e for one: unknown, an overload read as good. Their counts follow
the new rules once the next rollup run
rebuilds them (the stored requests are unchanged). A migration stands alone, so the statements of 0007's
`_forget_rollups` are repeated here rather than imported.

Revision ID: 0009
Revises: 0008
"""
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for statement in ("DELETE FROM slo_rollup_counts", "DELETE FROM slo_rollup_sketches",
                      "UPDATE slo_rollup_targets SET backfill_upto_id = 0, backfill_done_id = 0, "
                      "backfill_excluded = '[]'",
                      "UPDATE slo_rollup_state SET watermark_id = 0, gaps = '[]', version = version + 1"):
        op.execute(statement)


def downgrade() -> None:
    upgrade()  # the rollups of the older rule are rebuilt the same way
