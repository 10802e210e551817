"""requests gain their finish time, and SLO windows count a request when it finished, not when it arrived

A request is stored only once it has finished, so a window counted by arrival held only the requests
that arrived and finished inside it: the slow (bad) ones were missing from short burn windows. The
rollups were bucketed by arrival, so they are emptied here and rebuilt by the next rollup run.

Revision ID: 0007
Revises: 0006
"""
import logging

import sqlalchemy as sa
from alembic import op

log = logging.getLogger("controlplane.store.migrations")

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    n = op.get_bind().execute(sa.text("SELECT count(*) FROM requests")).scalar() or 0
    if n > 100_000:
        log.warning("migration 0007: filling in the finish time of %d stored requests and rebuilding the SLO "
                    "rollups; this takes a while (about 15 s per million rows on PostgreSQL here)", n)
    with op.batch_alter_table('requests') as batch:
        batch.add_column(sa.Column('finish_unix_s', sa.Double(), nullable=True))
    # As models.finish_of: an e2e past 7 days (a broken clock) counts at the arrival.
    op.execute("UPDATE requests SET finish_unix_s = arrival_unix_s + "
               "CASE WHEN e2e_s >= 0 AND e2e_s <= 604800 THEN e2e_s ELSE 0 END")
    with op.batch_alter_table('requests') as batch:
        batch.alter_column('finish_unix_s', existing_type=sa.Double(), nullable=False)
        batch.create_index('ix_requests_replica_finish', ['replica_id', 'finish_unix_s'], unique=False)
    _forget_rollups()


def downgrade() -> None:
    with op.batch_alter_table('requests') as batch:
        batch.drop_index('ix_requests_replica_finish')
        batch.drop_column('finish_unix_s')
    _forget_rollups()


def _forget_rollups() -> None:
    """The rollups' buckets follow the other time key: start them over (as `rollup.rebuild` does)."""
    op.execute("DELETE FROM slo_rollup_counts")
    op.execute("DELETE FROM slo_rollup_sketches")
    op.execute("UPDATE slo_rollup_targets SET backfill_upto_id = 0, backfill_done_id = 0, backfill_excluded = '[]'")
    op.execute("UPDATE slo_rollup_state SET watermark_id = 0, gaps = '[]', version = version + 1")
