from flask_smorest import Blueprint

blp = Blueprint("conversation", __name__)
