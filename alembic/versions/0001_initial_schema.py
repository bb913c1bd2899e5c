"""Create the initial schema

Revision ID: 0001
Revises:
Create Date: 2026-12-04 21:41:16.366727
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('job_runs',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('job', sa.String(length=64), nullable=False),
    sa.Column('status', sa.Enum('running', 'succeeded', 'failed', name='job_status', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_runs'))
    )
    with op.batch_alter_table('job_runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_job_runs_job_started_at'), ['job', 'started_at'], unique=False)

    op.create_table('model_versions',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('model', sa.String(length=128), nullable=False),
    sa.Column('version', sa.String(length=128), nullable=False),
    sa.Column('loader', sa.String(length=256), nullable=False),
    sa.Column('input_shape', sa.JSON(), nullable=False),
    sa.Column('num_classes', sa.Integer(), nullable=False),
    sa.Column('num_training_examples', sa.Integer(), nullable=False),
    sa.Column('is_current', sa.Boolean(), nullable=False),
    sa.Column('registered_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_versions')),
    sa.UniqueConstraint('model', 'version', name=op.f('uq_model_versions_model_version'))
    )
    op.create_table('heldout_evaluations',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('model_version_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('evaluated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('num_examples', sa.Integer(), nullable=False),
    sa.Column('accuracy', sa.Float(), nullable=False),
    sa.Column('per_class_accuracy', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_versions.id'], name=op.f('fk_heldout_evaluations_model_version_id_model_versions'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_heldout_evaluations'))
    )
    with op.batch_alter_table('heldout_evaluations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_heldout_evaluations_model_version_id_evaluated_at'), ['model_version_id', 'evaluated_at'], unique=False)

    op.create_table('predictions',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('model', sa.String(length=128), nullable=False),
    sa.Column('prediction_id', sa.String(length=256), nullable=False),
    sa.Column('model_version_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('predicted_class', sa.Integer(), nullable=False),
    sa.Column('confidence', sa.Float(), nullable=False),
    sa.Column('probabilities', sa.LargeBinary(), nullable=True),
    sa.Column('input_shape', sa.JSON(), nullable=False),
    sa.Column('input_data', sa.LargeBinary(), nullable=False),
    sa.Column('content_digest', sa.String(length=64), nullable=False),
    sa.Column('predicted_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_versions.id'], name=op.f('fk_predictions_model_version_id_model_versions'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_predictions')),
    sa.UniqueConstraint('model', 'prediction_id', name=op.f('uq_predictions_model_prediction_id'))
    )
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_predictions_model_version_id_predicted_at'), ['model_version_id', 'predicted_at'], unique=False)

    op.create_table('training_examples',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('model_version_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('row_index', sa.Integer(), nullable=False),
    sa.Column('example_id', sa.String(length=256), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('label', sa.Integer(), nullable=False),
    sa.Column('source', sa.String(length=256), nullable=False),
    sa.Column('added_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_versions.id'], name=op.f('fk_training_examples_model_version_id_model_versions'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_training_examples')),
    sa.UniqueConstraint('model_version_id', 'example_id', name=op.f('uq_training_examples_model_version_id_example_id'))
    )
    op.create_table('incidents',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('prediction_pk', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('model_version_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('state', sa.Enum('open', 'analyzing', 'analyzed', 'failed', 'acknowledged', 'resolved', name='incident_state', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('true_label', sa.Integer(), nullable=False),
    sa.Column('predicted_class', sa.Integer(), nullable=False),
    sa.Column('confidence', sa.Float(), nullable=False),
    sa.Column('opened_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('claimed_by', sa.String(length=128), nullable=True),
    sa.Column('failure_reason', sa.Text(), nullable=True),
    sa.Column('solver_iterations', sa.Integer(), nullable=True),
    sa.Column('solver_residual', sa.Float(), nullable=True),
    sa.Column('solver_converged', sa.Boolean(), nullable=True),
    sa.Column('solver_damping', sa.Float(), nullable=True),
    sa.Column('solver_negative_curvature', sa.Boolean(), nullable=True),
    sa.Column('analysis_seconds', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_versions.id'], name=op.f('fk_incidents_model_version_id_model_versions'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['prediction_pk'], ['predictions.id'], name=op.f('fk_incidents_prediction_pk_predictions'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_incidents')),
    sa.UniqueConstraint('prediction_pk', name=op.f('uq_incidents_prediction_pk'))
    )
    with op.batch_alter_table('incidents', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_incidents_state_updated_at'), ['state', 'updated_at'], unique=False)

    op.create_table('labels',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('prediction_pk', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('label', sa.Integer(), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['prediction_pk'], ['predictions.id'], name=op.f('fk_labels_prediction_pk_predictions'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_labels')),
    sa.UniqueConstraint('prediction_pk', name=op.f('uq_labels_prediction_pk'))
    )
    op.create_table('influence_results',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('incident_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('training_example_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['incident_id'], ['incidents.id'], name=op.f('fk_influence_results_incident_id_incidents'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['training_example_id'], ['training_examples.id'], name=op.f('fk_influence_results_training_example_id_training_examples'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_influence_results')),
    sa.UniqueConstraint('incident_id', 'rank', name=op.f('uq_influence_results_incident_id_rank'))
    )


def downgrade() -> None:
    op.drop_table('influence_results')
    op.drop_table('labels')
    with op.batch_alter_table('incidents', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_incidents_state_updated_at'))

    op.drop_table('incidents')
    op.drop_table('training_examples')
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_predictions_model_version_id_predicted_at'))

    op.drop_table('predictions')
    with op.batch_alter_table('heldout_evaluations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_heldout_evaluations_model_version_id_evaluated_at'))

    op.drop_table('heldout_evaluations')
    op.drop_table('model_versions')
    with op.batch_alter_table('job_runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_job_runs_job_started_at'))

    op.drop_table('job_runs')
