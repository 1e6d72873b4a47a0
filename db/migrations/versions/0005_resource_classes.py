"""jobs.resource_class (the worker pool a job needs: its Celery queue) and jobs.next_dispatch_at (when the dispatcher
publishes a queued job again, set at each publish, indexed with status so the sweep reads only due rows); workers:
the ledger's registry of live workers and the classes they serve

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
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('resource_class', sa.String(length=64), nullable=False, server_default='cpu'))
        batch_op.add_column(sa.Column('next_dispatch_at', sa.Float(), nullable=True))
        batch_op.create_index('ix_jobs_status_next_dispatch', ['status', 'next_dispatch_at'], unique=False)
    # Jobs queued before this revision are due at once: each is published one more time, which a claim makes harmless.
    op.execute("UPDATE jobs SET next_dispatch_at = COALESCE(last_dispatched_at, created_at) WHERE status = 'queued'")

    op.create_table('workers',
    sa.Column('id', sa.String(length=200), nullable=False),
    sa.Column('classes', sa.JSON(), nullable=False),
    sa.Column('started_at', sa.Float(), nullable=False),
    sa.Column('seen_at', sa.Float(), nullable=False),
    sa.Column('job_id', sa.String(length=40), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.create_index('ix_workers_seen_at', ['seen_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_index('ix_workers_seen_at')
    op.drop_table('workers')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_status_next_dispatch')
        batch_op.drop_column('next_dispatch_at')
        batch_op.drop_column('resource_class')
