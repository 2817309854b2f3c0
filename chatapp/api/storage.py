from flask_smorest import Blueprint

blp = Blueprint("storage", __name__)
