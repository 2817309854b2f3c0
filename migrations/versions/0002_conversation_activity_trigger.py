"""conversations.updated_at follows its messages, in the database

A message inserted, or a reply changing status (finished, failed, reaped), moves its conversation's
updated_at (the list's "newest activity first"). Doing it in a trigger saves a chat turn two UPDATE
statements: send inserts the turn and stores the reply, and the order follows by itself.

Revision ID: 0002
Revises: 0001
"""
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

TOUCH = ("UPDATE conversations SET updated_at = NEW.updated_at "
         "WHERE id = NEW.conversation_id AND updated_at < NEW.updated_at")


def upgrade():
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(f"CREATE FUNCTION chatapp_touch_conversation() RETURNS trigger LANGUAGE plpgsql AS $$ "
                   f"BEGIN {TOUCH}; RETURN NULL; END $$")
        op.execute("CREATE TRIGGER messages_touch_conversation AFTER INSERT OR UPDATE OF status ON messages "
                   "FOR EACH ROW EXECUTE FUNCTION chatapp_touch_conversation()")
    elif dialect == "sqlite":
        op.execute(f"CREATE TRIGGER messages_touch_conversation_insert AFTER INSERT ON messages BEGIN {TOUCH}; END")
        op.execute(f"CREATE TRIGGER messages_touch_conversation_update AFTER UPDATE OF status ON messages "
                   f"BEGIN {TOUCH}; END")
    else:
        raise NotImplementedError(f"no conversation activity trigger for {dialect}")


def downgrade():
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER messages_touch_conversation ON messages")
        op.execute("DROP FUNCTION chatapp_touch_conversation()")
    else:
        op.execute("DROP TRIGGER messages_touch_conversation_insert")
        op.execute("DROP TRIGGER messages_touch_conversation_update")
