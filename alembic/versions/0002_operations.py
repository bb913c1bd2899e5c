"""Add job-run slots, incident action times and retention indexes

Revision ID: 0002
Revises: 0001
Create Date: 2027-01-11 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('job_runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('scheduled_for', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('runner', sa.String(length=128), nullable=True))
        batch_op.create_unique_constraint(batch_op.f('uq_job_runs_job_scheduled_for'), ['job', 'scheduled_for'])

    with op.batch_alter_table('incidents', schema=None) as batch_op:
        batch_op.add_column(sa.Column('acknowledged_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('resolved_at', sa.DateTime(timezone=True), nullable=True))

    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_predictions_received_at'), ['received_at'], unique=False)

    with op.batch_alter_table('labels', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_labels_received_at'), ['received_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('labels', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_labels_received_at'))

    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_predictions_received_at'))

    with op.batch_alter_table('incidents', schema=None) as batch_op:
        batch_op.drop_column('resolved_at')
        batch_op.drop_column('acknowledged_at')

    with op.batch_alter_table('job_runs', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('uq_job_runs_job_scheduled_for'), type_='unique')
        batch_op.drop_column('runner')
        batch_op.drop_column('scheduled_for')
