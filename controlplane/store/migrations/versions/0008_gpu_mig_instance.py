"""GPU samples gain the MIG instance: each instance of a partitioned GPU is its own reading

Revision ID: 0008
Revises: 0007
"""
import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('gpu_samples') as batch:
        batch.add_column(sa.Column('mig_instance', sa.String(length=60), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('gpu_samples') as batch:
        batch.drop_column('mig_instance')
