"""The OpenAI Files API: `/v1/files` (upload with scope `upload`; read with `upload`, `batch` or
`eval`).

A file belongs to the project of the key that uploaded it (a batch's output and error files to
the batch's project): every key of that project may use it (an `upload` key uploads, a `batch`
key runs it), and to any other project it does not exist (404, never 403). Uploads and downloads
are streamed in blocks.
"""

from __future__ import annotations

from flask import Blueprint, Response, g, request

from jobs.files import FileTooLarge
from jobs.tenancy import UnknownCursor
from webapp.apidoc import accepts, documented
from webapp.arguments import FileList, FileUpload
from webapp.auth import require_scope
from webapp.context import services
from webapp.errors import APIError
from webapp.paging import page, unknown_cursor

bp = Blueprint("files", __name__)

READERS = ("upload", "batch", "eval")


def _store():
    return services().files


def _get(file_id: str):
    stored = _store().get(file_id, g.api_key.project)
    if stored is None:
        raise APIError(404, f"No such file: {file_id}", code="file_not_found", param="file_id")
    return stored


@bp.post("/v1/files")
@require_scope("upload")
@accepts(form=FileUpload(), summary="Upload a file (multipart: `purpose`, `file`)")
def upload(form: dict):
    settings = services().settings
    upload = request.files.get("file")
    if upload is None:
        raise APIError(400, "Send the file as multipart form field 'file'.",
                       code="missing_file", param="file")
    try:
        stored = _store().save_stream(g.api_key.name, form["purpose"],
                                      upload.filename or "upload", upload.stream,
                                      settings.batch_max_file_bytes, g.api_key.project)
    except FileTooLarge as exc:
        raise APIError(413, f"The file is larger than the limit of {exc.limit} bytes "
                       "(BATCH_MAX_FILE_BYTES).", code="file_too_large", param="file") from None
    return stored.public()


@bp.before_request
def _lift_upload_limit():
    # Batch files may be far larger than an API call: lift the body limit for the upload
    # route only, before anything reads the form (the multipart parser applies it).
    if request.endpoint == "files.upload":
        settings = services().settings
        request.max_content_length = settings.batch_max_file_bytes + 1024 * 1024


@bp.get("/v1/files")
@require_scope(*READERS)
@accepts(query=FileList(), summary="List this project's files, newest first")
def list_files(args: dict):
    try:
        files, has_more = _store().list(args.get("purpose"), args.get("after"), args["limit"],
                                        g.api_key.project)
    except UnknownCursor:
        raise unknown_cursor() from None
    return page([f.public() for f in files], has_more)


@bp.get("/v1/files/<file_id>")
@require_scope(*READERS)
@documented("A file's metadata")
def retrieve(file_id: str):
    return _get(file_id).public()


@bp.get("/v1/files/<file_id>/content")
@require_scope(*READERS)
@documented("A file's content", content_type="application/octet-stream")
def content(file_id: str):
    stored = _get(file_id)
    return Response(_store().read(stored.id), content_type="application/octet-stream",
                    headers={"Content-Length": str(stored.bytes)}, direct_passthrough=True)


@bp.delete("/v1/files/<file_id>")
@require_scope("upload")
@documented("Delete a file")
def delete(file_id: str):
    stored = _get(file_id)
    _store().delete(stored.id)
    return {"id": stored.id, "object": "file", "deleted": True}
