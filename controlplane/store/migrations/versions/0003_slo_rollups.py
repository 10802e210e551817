"""slo rollups: per-bucket exact target counts and latency sketches, with the rollup watermark

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('slo_rollup_state',
    sa.Column('name', sa.String(length=50), nullable=False),
    sa.Column('watermark_id', sa.BigInteger(), nullable=False),
    sa.Column('gaps', sa.JSON(), nullable=False),
    sa.Column('version', sa.BigInteger(), nullable=False),
    sa.Column('updated_unix_s', sa.Double(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('slo_rollup_targets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=500), nullable=False),
    sa.Column('backfill_upto_id', sa.BigInteger(), nullable=False),
    sa.Column('backfill_done_id', sa.BigInteger(), nullable=False),
    sa.Column('backfill_excluded', sa.JSON(), nullable=False),
    sa.Column('created_unix_s', sa.Double(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key')
    )
    op.create_table('slo_rollup_counts',
    sa.Column('target_id', sa.Integer(), nullable=False),
    sa.Column('level_s', sa.Integer(), nullable=False),
    sa.Column('bucket_start_unix_s', sa.BigInteger(), nullable=False),
    sa.Column('replica_id', sa.Integer(), nullable=False),
    sa.Column('good', sa.BigInteger(), nullable=False),
    sa.Column('total', sa.BigInteger(), nullable=False),
    sa.Column('unknown', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['replica_id'], ['replicas.id'], ),
    sa.ForeignKeyConstraint(['target_id'], ['slo_rollup_targets.id'], ),
    sa.PrimaryKeyConstraint('target_id', 'level_s', 'bucket_start_unix_s', 'replica_id')
    )
    op.create_table('slo_rollup_sketches',
    sa.Column('sli_column', sa.String(length=20), nullable=False),
    sa.Column('level_s', sa.Integer(), nullable=False),
    sa.Column('bucket_start_unix_s', sa.BigInteger(), nullable=False),
    sa.Column('replica_id', sa.Integer(), nullable=False),
    sa.Column('n_values', sa.BigInteger(), nullable=False),
    sa.Column('n_nulls', sa.BigInteger(), nullable=False),
    sa.Column('sketch', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['replica_id'], ['replicas.id'], ),
    sa.PrimaryKeyConstraint('sli_column', 'level_s', 'bucket_start_unix_s', 'replica_id')
    )


def downgrade() -> None:
    op.drop_table('slo_rollup_sketches')
    op.drop_table('slo_rollup_counts')
    op.drop_table('slo_rollup_targets')
    op.drop_table('slo_rollup_state')
