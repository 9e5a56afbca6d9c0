"""The OpenAI Files API: `/v1/files` (upload with scope `upload`; read with `upload` or `batch`).

Files are shared by every key of the deployment (like an OpenAI project's files); batch jobs, not
files, are private to the key that made them. Uploads and downloads are streamed in blocks.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, g, request

from tasks.filestore import FileTooLarge
from webapp.auth import require_scope
from webapp.errors import APIError
from webapp.paging import page, page_args

bp = Blueprint("files", __name__)

PURPOSES = ("batch", "evals", "user_data")
READERS = ("upload", "batch", "eval")


def _store():
    return current_app.extensions["files"]


def _get(file_id: str):
    stored = _store().get(file_id)
    if stored is None:
        raise APIError(404, f"No such file: {file_id}", code="file_not_found", param="file_id")
    return stored


@bp.post("/v1/files")
@require_scope("upload")
def upload():
    settings = current_app.extensions["settings"]
    # Batch files may be far larger than an API call: lift the body limit for this route only.
    request.max_content_length = settings.batch_max_file_bytes + 1024 * 1024
    purpose = request.form.get("purpose")
    if purpose not in PURPOSES:
        raise APIError(400, f"'purpose' must be one of {', '.join(PURPOSES)}.",
                       code="invalid_value", param="purpose")
    upload = request.files.get("file")
    if upload is None:
        raise APIError(400, "Send the file as multipart form field 'file'.",
                       code="missing_file", param="file")
    try:
        stored = _store().save_stream(g.api_key.name, purpose, upload.filename or "upload",
                                      upload.stream, settings.batch_max_file_bytes)
    except FileTooLarge as exc:
        raise APIError(413, f"The file is larger than {exc.limit} bytes.",
                       code="file_too_large", param="file") from None
    return stored.public()


@bp.get("/v1/files")
@require_scope(*READERS)
def list_files():
    after, limit = page_args(default=100, maximum=10_000)
    files, has_more = _store().list(request.args.get("purpose"), after, limit)
    return page([f.public() for f in files], has_more)


@bp.get("/v1/files/<file_id>")
@require_scope(*READERS)
def retrieve(file_id: str):
    return _get(file_id).public()


@bp.get("/v1/files/<file_id>/content")
@require_scope(*READERS)
def content(file_id: str):
    stored = _get(file_id)
    return Response(_store().read(stored.id), content_type="application/octet-stream",
                    headers={"Content-Length": str(stored.bytes)}, direct_passthrough=True)


@bp.delete("/v1/files/<file_id>")
@require_scope("upload")
def delete(file_id: str):
    stored = _get(file_id)
    _store().delete(stored.id)
    return {"id": stored.id, "object": "file", "deleted": True}
