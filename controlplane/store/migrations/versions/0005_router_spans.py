"""the router's spans: one row per proxied request, with its tenant (cost per tenant)

Revision ID: 0005
Revises: 0004
"""
import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('router_spans',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('trace_id', sa.String(length=32), nullable=False),
    sa.Column('span_id', sa.String(length=16), nullable=False),
    sa.Column('parent_span_id', sa.String(length=16), nullable=True),
    sa.Column('tenant', sa.String(length=64), nullable=True),
    sa.Column('replica', sa.String(length=200), nullable=True),
    sa.Column('started_unix_s', sa.Double(), nullable=False),
    sa.Column('ended_unix_s', sa.Double(), nullable=False),
    sa.Column('status', sa.Integer(), nullable=True),
    sa.Column('ok', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('trace_id', 'span_id', name='uq_router_spans_span')
    )
    op.create_index('ix_router_spans_started', 'router_spans', ['started_unix_s'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_router_spans_started', table_name='router_spans')
    op.drop_table('router_spans')
