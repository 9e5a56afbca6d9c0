"""Which engine made a stored response, and for which project.

vLLM keeps a response it made (`store`, with `VLLM_ENABLE_RESPONSES_API_STORE=1`) in that engine
process only, so `GET /v1/responses/{id}` and its cancel must reach the very instance that made
it. The gateway notes, when the engine answers `POST /v1/responses`, the response id's project,
instance and model in Redis (`gw:response:<id>`, kept for a day), and answers a later look-up
only for a key of the same project: a response of another project is a 404, as an unknown one
is, so ids cannot be probed across tenants. The instance gone (stopped, restarted), the
response is gone with it: 404 too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import redis

KEEP_SECONDS = 24 * 3600
# What an engine's response id looks like (vLLM: resp_ and hex); anything else is never stored
# nor looked up.
RESPONSE_ID = re.compile(r"resp_[A-Za-z0-9_-]{1,128}")
_FIRST_ID = re.compile(rb'"id":\s*"(resp_[A-Za-z0-9_-]{1,128})"')


@dataclass(frozen=True, slots=True)
class ResponseOwner:
    project: str
    instance_id: str
    model: str


def response_id_in(data: bytes) -> str | None:
    """The first response id in an engine's answer (a whole body, or a stream's first events:
    `response.created` carries the response with its id)."""
    found = _FIRST_ID.search(data)
    return found.group(1).decode() if found else None


class ResponseOwners:
    def __init__(self, client: redis.Redis):
        self.redis = client

    @staticmethod
    def _key(response_id: str) -> str:
        return f"gw:response:{response_id}"

    def remember(self, response_id: str, owner: ResponseOwner) -> None:
        value = json.dumps([owner.project, owner.instance_id, owner.model])
        # nx: the first note wins (a stream's later events repeat the id).
        self.redis.set(self._key(response_id), value, ex=KEEP_SECONDS, nx=True)

    def owner(self, response_id: str, project: str) -> ResponseOwner | None:
        """The response's owner if `project` made it; None for an unknown id or another's."""
        if not RESPONSE_ID.fullmatch(response_id):
            return None
        value = self.redis.get(self._key(response_id))
        if value is None:
            return None
        owner_project, instance_id, model = json.loads(value)
        if owner_project != project:
            return None
        return ResponseOwner(owner_project, instance_id, model)
