"""live SLO alert episodes and tuner recommendations

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('recommendations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('created_unix_s', sa.Double(), nullable=False),
    sa.Column('deployment', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=20), nullable=False),
    sa.Column('mode', sa.String(length=10), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('reason', sa.String(length=100), nullable=False),
    sa.Column('current', sa.JSON(), nullable=False),
    sa.Column('proposed', sa.JSON(), nullable=False),
    sa.Column('evidence', sa.JSON(), nullable=False),
    sa.Column('confidence', sa.Double(), nullable=True),
    sa.Column('decided_unix_s', sa.Double(), nullable=True),
    sa.Column('decided_by', sa.String(length=20), nullable=True),
    sa.Column('outcome', sa.JSON(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_recommendations_created', 'recommendations', ['created_unix_s'], unique=False)
    op.create_table('slo_alerts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('slo', sa.String(length=200), nullable=False),
    sa.Column('deployment', sa.String(length=200), nullable=False),
    sa.Column('severity', sa.String(length=10), nullable=False),
    sa.Column('alertname', sa.String(length=100), nullable=False),
    sa.Column('state', sa.String(length=10), nullable=False),
    sa.Column('started_unix_s', sa.Double(), nullable=False),
    sa.Column('fired_unix_s', sa.Double(), nullable=True),
    sa.Column('resolved_unix_s', sa.Double(), nullable=True),
    sa.Column('last_eval_unix_s', sa.Double(), nullable=False),
    sa.Column('notified_unix_s', sa.Double(), nullable=True),
    sa.Column('evidence', sa.JSON(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_slo_alerts_key', 'slo_alerts', ['slo', 'severity', 'state'], unique=False)
    op.create_index('ix_slo_alerts_ts', 'slo_alerts', ['started_unix_s'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_slo_alerts_ts', table_name='slo_alerts')
    op.drop_index('ix_slo_alerts_key', table_name='slo_alerts')
    op.drop_table('slo_alerts')
    op.drop_index('ix_recommendations_created', table_name='recommendations')
    op.drop_table('recommendations')
