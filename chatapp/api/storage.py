"""The local backend's signed URLs: PUT and GET /api/v1/storage/<key> (no token: the signature is the grant)."""

from __future__ import annotations

from flask import Response, current_app, request
from flask_smorest import Blueprint
from werkzeug.wsgi import wrap_file

from chatapp.deps import deps
from chatapp.errors import ApiError, Conflict, NotFound
from chatapp.extensions import db
from chatapp.models import Conversation
from chatapp.storage import (
    InvalidKey,
    InvalidSignature,
    LocalStorage,
    NotAnImage,
    ObjectNotFound,
    StorageFull,
    TooLarge,
)

blp = Blueprint("storage", __name__, description="Embedded image store (local backend only)")


def _local() -> LocalStorage:
    backend = deps().storage
    if not isinstance(backend, LocalStorage):
        raise NotFound.of("object")
    return backend


def _grant(backend: LocalStorage, key: str):
    # A PUT without Content-Type is checked as "", so it fails like a wrong one: the signed type is part of the URL.
    content_type = request.headers.get("Content-Type", "") if request.method == "PUT" else None
    try:
        return backend.verify(request.method, key, request.args, content_type=content_type)
    except InvalidSignature as error:
        if error.code == "method_not_allowed":  # a genuine URL for the other verb; a 405 names the allowed ones
            allow = "GET, HEAD" if request.method == "PUT" else "PUT"
            raise ApiError(error.code, f"This storage URL is not valid: {error}.", status=405,
                           headers={"Allow": allow}) from None
        raise ApiError(error.code, f"This storage URL is not valid: {error}.", status=403) from None
    except InvalidKey:
        raise NotFound.of("object") from None


# merge_slashes=False: "//" in a key path is a 404 in our JSON shape, not werkzeug's HTML 308 redirect.
@blp.route("/<path:key>", methods=["PUT"], merge_slashes=False)
@blp.doc(responses={200: {"description": "stored"}, 403: {"description": "signature_invalid / url_expired"},
                    404: {"description": "conversation_not_found (deleted since the URL was issued)"},
                    405: {"description": "method_not_allowed (a download URL)"},
                    409: {"description": "object_exists"}, 413: {"description": "payload_too_large"}, 415: {"description": "not_an_image"}})
def upload(key):
    """Upload an image with the exact URL and headers `get_upload_presigned_url` gave."""
    backend = _local()
    grant = _grant(backend, key)
    _check_conversation(key)
    if backend.exists(key):
        # A sent message refers to this image: replacing it would change history under the user's feet.
        raise Conflict("object_exists", "This image was already uploaded; ask for a new upload URL.")
    # The signed size instead of the JSON body limit; one byte over it so that a chunked body of exactly
    # max_bytes ends cleanly (werkzeug's capped stream raises on any read at its cap) and save() judges the size.
    request.max_content_length = grant.max_bytes + 1
    try:
        size = backend.save(key, request.stream, grant.content_type, grant.max_bytes)
    except TooLarge:
        raise ApiError("payload_too_large", f"The image is larger than {grant.max_bytes} bytes.", status=413) from None
    except NotAnImage:
        raise ApiError("not_an_image", f"The body is not a {grant.content_type} image.", status=415) from None
    except StorageFull:
        raise ApiError("storage_full", "The image store is full; try again later.", status=507) from None
    except InvalidKey:
        raise NotFound.of("object") from None
    return {"key": key, "size": size}


def _check_conversation(key: str) -> None:
    """An upload URL outlives a deleted conversation: refuse it, or its file would be an orphan forever."""
    user_id, conversation_id, *_ = [*key.split("/"), "", ""]
    try:
        conversation = db.session.get(Conversation, conversation_id) if conversation_id else None
        if conversation is None or conversation.user_id != user_id:
            raise NotFound.of("conversation")
    finally:
        db.session.remove()  # no database connection held while a slow client sends the body


@blp.route("/<path:key>", methods=["GET"], merge_slashes=False)
@blp.doc(responses={200: {"description": "the image"}, 403: {"description": "signature_invalid / url_expired"}})
def download(key):
    """Download an image with a URL from history (or given to the model)."""
    backend = _local()
    _grant(backend, key)
    try:
        handle, size, content_type = backend.open(key)
    except (ObjectNotFound, InvalidKey):
        raise NotFound.of("object") from None
    response = Response(wrap_file(request.environ, handle), mimetype=content_type, direct_passthrough=True)
    response.content_length = size
    response.headers["Cache-Control"] = f"private, max-age={min(3600, current_app.config['DOWNLOAD_URL_SECONDS'])}"
    response.headers["Content-Security-Policy"] = "default-src 'none'; sandbox"
    return response
