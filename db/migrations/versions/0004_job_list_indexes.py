"""jobs: an index per list filter (project + status + id, project + method + id), so a filtered page is one range

Revision ID: 0004
Revises: 0003
"""
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_project_status_id', ['project_id', 'status', 'id'], unique=False)
        batch_op.create_index('ix_jobs_project_method_id', ['project_id', 'method', 'id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_project_method_id')
        batch_op.drop_index('ix_jobs_project_status_id')
