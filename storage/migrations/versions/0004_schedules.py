"""schedules and leader leases

Revision ID: 0004_schedules
Revises: 0001
"""
from alembic import op
import sqlalchemy as sa


revision = '0004_schedules'
down_revision = '0003_s3t'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'schedules',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('lineage_id', sa.Uuid(), nullable=False),
        sa.Column('action', sa.String(length=32), nullable=False),
        sa.Column('cron', sa.String(length=128), nullable=False),
        sa.Column('min_tickets', sa.Integer(), nullable=False),
        sa.Column('max_tickets', sa.Integer(), nullable=False),
        sa.Column('enabled', sa.Boolean(), nullable=False),
        sa.Column('next_run_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('last_run_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_result', sa.JSON(), nullable=True),
        sa.Column('created_by', sa.String(length=128), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['lineage_id'], ['lineages.id']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('lineage_id', 'action'),
    )
    op.create_table(
        'leader_leases',
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('owner', sa.String(length=128), nullable=False),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('name'),
    )


def downgrade() -> None:
    op.drop_table('leader_leases')
    op.drop_table('schedules')
