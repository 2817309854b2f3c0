"""Unbound extension singletons; create_app() binds them to an app."""

from flask_jwt_extended import JWTManager
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase

from chatapp.api_doc import ChatApi


class Base(DeclarativeBase):
    pass


# Objects keep their values after commit: a response is built from what was committed, without a reload that
# could fail (database gone) after the write already succeeded and turn a success into an error.
db = SQLAlchemy(model_class=Base, session_options={"expire_on_commit": False})
jwt = JWTManager()
api = ChatApi()
# Limits are declared on the views; remote_addr is already the client address (ProxyFix honours trusted hops).
limiter = Limiter(key_func=get_remote_address, headers_enabled=True)


def __getattr__(name: str):
    # `migrate` is made on first use: only the `flask db` commands need Alembic, gunicorn workers never do.
    if name == "migrate":
        from flask_migrate import Migrate

        globals()["migrate"] = Migrate()
        return globals()["migrate"]
    raise AttributeError(name)
