"""S3T: datasets, records, s3t_checkpoints

Revision ID: 0003_s3t
Revises: 0001
"""
from alembic import op
import sqlalchemy as sa


revision = '0003_s3t'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'datasets',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('name', sa.String(length=128), nullable=False),
        sa.Column('shards', sa.Integer(), nullable=True),
        sa.Column('slices', sa.Integer(), nullable=True),
        sa.Column('created_by', sa.String(length=128), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('name'),
    )
    op.create_table(
        'records',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('dataset_id', sa.Uuid(), nullable=False),
        sa.Column('record_id', sa.String(length=256), nullable=False),
        sa.Column('subject_id', sa.String(length=256), nullable=True),
        sa.Column('content', sa.JSON(), nullable=True),
        sa.Column('content_sha256', sa.String(length=64), nullable=False),
        sa.Column('shard', sa.Integer(), nullable=True),
        sa.Column('slice', sa.Integer(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('deleted_by_ticket', sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('dataset_id', 'record_id'),
    )
    op.create_index('ix_records_subject', 'records', ['dataset_id', 'subject_id'])
    op.create_table(
        's3t_checkpoints',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('prefix_hash', sa.String(length=64), nullable=False),
        sa.Column('dataset_id', sa.Uuid(), nullable=False),
        sa.Column('shard', sa.Integer(), nullable=False),
        sa.Column('sequence', sa.Integer(), nullable=False),
        sa.Column('position', sa.Integer(), nullable=False),
        sa.Column('slices', sa.JSON(), nullable=False),
        sa.Column('layers', sa.JSON(), nullable=False),
        sa.Column('record_ids', sa.JSON(), nullable=False),
        sa.Column('record_set_sha256', sa.String(length=64), nullable=False),
        sa.Column('object_key', sa.String(length=1024), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('prefix_hash'),
    )


def downgrade() -> None:
    op.drop_table('s3t_checkpoints')
    op.drop_index('ix_records_subject', table_name='records')
    op.drop_table('records')
    op.drop_table('datasets')
