from flask_smorest import Blueprint

blp = Blueprint("model_config", __name__)
