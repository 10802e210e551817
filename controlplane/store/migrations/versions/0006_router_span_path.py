"""the router's spans gain the request's method and path: only inference requests have a vLLM span to match

Revision ID: 0006
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('router_spans') as batch:
        batch.add_column(sa.Column('method', sa.String(length=16), nullable=True))
        batch.add_column(sa.Column('path', sa.String(length=300), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('router_spans') as batch:
        batch.drop_column('path')
        batch.drop_column('method')
