"""OpenAI's Conversations API (`/v1/conversations`), kept in memory.

A conversation is an id, its metadata and a list of items (messages, `function_call`, `function_call_output` and
`reasoning` items, as the Responses API takes and gives them). `POST /v1/responses` with `conversation` starts from
its items (they come before the request's `input`, as if sent in it) and, once the response completes (or stops
at max_output_tokens), adds the request's input items and the response's output items to it, so the next request
needs to send only what is new. One response at a time runs on a conversation: another one while it runs is a 409
(`conversation_locked`), as OpenAI's is; a response that fails or is cancelled adds nothing.

    POST   /v1/conversations                          create (`items`, up to 20; `metadata`)
    GET    /v1/conversations/{id}                     retrieve
    POST   /v1/conversations/{id}                     update its metadata
    DELETE /v1/conversations/{id}                     delete
    GET    /v1/conversations/{id}/items               list (`limit`, `order`, `after`)
    POST   /v1/conversations/{id}/items               add up to 20 items
    GET    /v1/conversations/{id}/items/{item_id}     retrieve an item
    DELETE /v1/conversations/{id}/items/{item_id}     delete an item (answers the conversation)

The server keeps at most --responses-store conversations (the least recently used go first when a new one would
pass that; 0 turns the API off), in memory, and with --responses-dir also one JSON file each, read back at start
(so they outlive a restart; their order then is that of their last change). They are not scoped per API key.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from ..io import JsonRecords
from .errors import APIError, invalid
from .protocol import _Strict, items_page, page
from .responses import ResponsesRequest, stored_item

MAX_ITEMS = 20  # items per create call, as OpenAI's
log = logging.getLogger("dgemma.serve")


def _metadata(value: dict[str, str] | None) -> dict[str, str] | None:
    """OpenAI's metadata rules: at most 16 pairs, keys up to 64 characters, values up to 512."""
    if value is not None:
        if len(value) > 16:
            raise ValueError("metadata holds at most 16 key-value pairs")
        for k, v in value.items():
            if len(k) > 64 or len(v) > 512:
                raise ValueError(f"metadata keys are at most 64 characters and values at most 512 (key {k[:64]!r})")
    return value


class ConversationCreate(_Strict):
    items: list[Any] | None = Field(None, max_length=MAX_ITEMS)
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None  # OpenAI's abuse monitoring: accepted, not used

    _check = field_validator("metadata")(_metadata)


class ConversationUpdate(_Strict):
    metadata: dict[str, str]

    _check = field_validator("metadata")(_metadata)


class ItemsCreate(_Strict):
    items: list[Any] = Field(..., min_length=1, max_length=MAX_ITEMS)


@dataclass
class Conversation:
    id: str
    created_at: int
    metadata: dict[str, str]
    items: list[dict[str, Any]] = field(default_factory=list)
    holder: ResponsesRequest | None = None  # the request of the response running on it
    jobs: list | None = None  # that response's rows (None while it is being planned)

    def object(self) -> dict[str, Any]:
        return {"id": self.id, "object": "conversation", "created_at": self.created_at, "metadata": self.metadata}

    def busy(self) -> bool:
        """A response runs on it: planned, or with rows still running (rows that all ended free it even if their
        response was never read to the end, say a stream whose client went away before its first byte)."""
        return self.holder is not None and (self.jobs is None or not all(j.finished for j in self.jobs))


class ConversationStore:
    """Conversations by id, the most recently used last (the event loop's only); with `root`, saved there too."""

    def __init__(self, size: int, root: Path | None = None):
        self.size = size
        self.entries: OrderedDict[str, Conversation] = OrderedDict()
        self.disk = None if root is None or not size else JsonRecords(root)
        if self.disk is not None:
            for cid, record in self.disk.load(log):
                try:
                    head = record["conversation"]
                    conv = Conversation(cid, int(head["created_at"]), dict(head["metadata"]), list(record["items"]))
                except (KeyError, TypeError, ValueError):
                    log.warning("skipping a stored conversation not in dgemma's format: %s.json", cid)
                    continue
                self.entries[cid] = conv
            self._trim()

    def _save(self, conv: Conversation) -> None:
        if self.disk is not None and self.entries.get(conv.id) is conv:
            self.disk.save(conv.id, {"conversation": conv.object(), "items": conv.items})

    def _trim(self) -> None:
        """Drop the least recently used conversations past `size` (not one a response is running on)."""
        for cid in list(self.entries):
            if len(self.entries) <= self.size:
                break
            if not self.entries[cid].busy():
                del self.entries[cid]
                if self.disk is not None:
                    self.disk.remove(cid)

    # ------------------------------------------------------------ the API
    def create(self, body: ConversationCreate) -> dict[str, Any]:
        if not self.size:
            raise APIError(403, "this server keeps no conversations: start it with --responses-store above 0",
                           code="conversations_disabled")
        conv = Conversation(f"conv_{uuid.uuid4().hex}", int(time.time()), body.metadata or {})
        self._add(conv, body.items or [])
        self.entries[conv.id] = conv
        self._save(conv)
        self._trim()
        return conv.object()

    def get(self, cid: str, param: str = "conversation_id") -> Conversation:
        conv = self.entries.get(cid)
        if conv is None:
            raise APIError(404, f"Conversation with id '{cid}' not found.", param=param, code="conversation_not_found")
        self.entries.move_to_end(cid)
        return conv

    def update(self, cid: str, body: ConversationUpdate) -> dict[str, Any]:
        conv = self.get(cid)
        conv.metadata = body.metadata
        self._save(conv)
        return conv.object()

    def delete(self, cid: str) -> dict[str, Any]:
        self.get(cid)
        del self.entries[cid]
        if self.disk is not None:
            self.disk.remove(cid)
        return {"id": cid, "object": "conversation.deleted", "deleted": True}

    def add_items(self, cid: str, body: ItemsCreate) -> dict[str, Any]:
        conv = self.get(cid)
        added = self._add(conv, body.items)
        self._save(conv)
        return page(added)

    def list_items(self, cid: str, limit: int = 20, order: str = "desc", after: str | None = None) -> dict[str, Any]:
        return items_page(self.get(cid).items, limit, order, after)

    def item(self, cid: str, item_id: str) -> dict[str, Any]:
        conv = self.get(cid)
        return conv.items[self._index(conv, item_id)]

    def delete_item(self, cid: str, item_id: str) -> dict[str, Any]:
        conv = self.get(cid)
        del conv.items[self._index(conv, item_id)]
        self._save(conv)
        return conv.object()

    @staticmethod
    def _index(conv: Conversation, item_id: str) -> int:
        for i, item in enumerate(conv.items):
            if item.get("id") == item_id:
                return i
        raise APIError(404, f"Item with id '{item_id}' not found in conversation '{conv.id}'.", param="item_id",
                       code="item_not_found")

    def _add(self, conv: Conversation, items: list[Any]) -> list[dict[str, Any]]:
        """Check every item first (a 400 naming `items.N` adds none of them), then append them all."""
        new = [stored_item(item, f"items.{i}") for i, item in enumerate(items)]
        ids = {item["id"] for item in conv.items}
        for i, item in enumerate(new):
            if item["id"] in ids:
                raise invalid(f"conversation '{conv.id}' already holds an item with id '{item['id']}'", f"items.{i}.id")
            ids.add(item["id"])
        conv.items.extend(new)
        return new

    # ------------------------------------------------------------ responses on a conversation
    def open(self, req: ResponsesRequest) -> None:
        """Start a response on `req.conversation`: its items become the request's history, and the conversation is
        held until `release` (409 while another response holds it)."""
        if req.conversation is None:
            return
        cid = req.conversation.get("id") if isinstance(req.conversation, dict) else req.conversation
        if not isinstance(cid, str):
            raise invalid('conversation must be a conversation id or {"id": ...}', "conversation")
        conv = self.get(cid, "conversation")
        if conv.busy():
            raise APIError(409, f"Another response is in progress on conversation '{cid}'. Retry once it has "
                                "finished.", param="conversation", code="conversation_locked")
        conv.holder, conv.jobs = req, None
        req._conversation, req._history = conv, list(conv.items)

    def hold(self, req: ResponsesRequest, jobs: list) -> None:
        """The response's rows are queued: the conversation stays held while they run."""
        conv = req._conversation
        if conv is not None and conv.holder is req:
            conv.jobs = jobs

    def finish(self, req: ResponsesRequest, obj: dict[str, Any]) -> None:
        """The response has ended: a completed (or incomplete) one adds its input and output items (unless the
        conversation was deleted meanwhile); any one frees the conversation."""
        conv = req._conversation
        if conv is None:
            return
        if obj["status"] in ("completed", "incomplete") and self.entries.get(conv.id) is conv:
            conv.items.extend(req.input_items() + [dict(item) for item in obj["output"]])
            self._save(conv)
        self.release(req)

    def release(self, req: ResponsesRequest) -> None:
        conv = req._conversation
        if conv is not None and conv.holder is req:
            conv.holder = conv.jobs = None
