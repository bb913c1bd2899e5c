"""Add release checks and ranking details

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 22:26:36.988711
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('release_checks',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('model_version_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('kind', sa.Enum('gradient_norms', 'hessian_factors', name='release_check_kind', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('format_version', sa.Integer(), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.Column('computed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('seconds', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_versions.id'], name=op.f('fk_release_checks_model_version_id_model_versions'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_release_checks')),
    sa.UniqueConstraint('model_version_id', 'kind', name=op.f('uq_release_checks_model_version_id_kind'))
    )
    with op.batch_alter_table('incidents', schema=None) as batch_op:
        batch_op.add_column(sa.Column('solver', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('solver_captured', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('ranking_reliable', sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column('score_kind', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('source_influence', sa.JSON(), nullable=True))

    with op.batch_alter_table('influence_results', schema=None) as batch_op:
        batch_op.add_column(sa.Column('rank_score', sa.Float(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('influence_results', schema=None) as batch_op:
        batch_op.drop_column('rank_score')

    with op.batch_alter_table('incidents', schema=None) as batch_op:
        batch_op.drop_column('source_influence')
        batch_op.drop_column('score_kind')
        batch_op.drop_column('ranking_reliable')
        batch_op.drop_column('solver_captured')
        batch_op.drop_column('solver')

    op.drop_table('release_checks')
