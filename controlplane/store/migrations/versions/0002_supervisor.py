"""supervisor: replica runtime handle and desired state, for re-adoption after a restart

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('deployments') as batch:
        batch.add_column(sa.Column('desired_replicas', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('engine_config', sa.JSON(), nullable=True))
        batch.add_column(sa.Column('updated_unix_s', sa.Double(), nullable=True))
    with op.batch_alter_table('replicas') as batch:
        batch.add_column(sa.Column('runtime', sa.JSON(), nullable=True))
        batch.add_column(sa.Column('updated_unix_s', sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('deployments') as batch:
        batch.drop_column('updated_unix_s')
        batch.drop_column('engine_config')
        batch.drop_column('desired_replicas')
    with op.batch_alter_table('replicas') as batch:
        batch.drop_column('updated_unix_s')
        batch.drop_column('runtime')
