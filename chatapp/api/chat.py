from flask_smorest import Blueprint

blp = Blueprint("chat", __name__)
