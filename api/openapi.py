"""The OpenAPI 3.1 document of the HTTP API, served at `GET /openapi.json`.

Written out rather than generated: the rows are validated by the producer's parser
(`core.changes.parse_change`), not by a schema, so this describes that parser's fields;
`tests/unit/test_api.py` keeps its field list equal to the parser's.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from core.changes import KNOWN_FIELDS

# What each import-row field is (README, "Command line"); a field the parser knows and
# this does not describe is still listed, pointing to the import format.
FIELDS: dict[str, dict[str, Any]] = {
    "subscription_group_id": {"type": "string", "description": "the subscription group's id"},
    "subscription_state": {"type": "string", "enum": ["subscribed", "unsubscribed"]},
    "external_id": {"type": "string", "description": "exactly one of external_id, email, phone"},
    "email": {"type": "string", "description": "exactly one of external_id, email, phone"},
    "phone": {"type": "string", "description": "E.164 (+14155550100); exactly one identifier"},
    "use_double_opt_in_logic": {"type": "boolean", "description": "SMS groups only"},
    "delay_seconds": {"type": "number", "minimum": 0, "maximum": 604800},
    "occurred_at": {
        "type": ["string", "number"],
        "description": "when the change happened at its source: RFC 3339 with a UTC offset, "
        "or seconds since the epoch; the change that occurred last wins",
    },
    "source": {"type": "string", "maxLength": 100, "description": "who or what made it"},
    "respect_opt_out": {
        "type": "boolean",
        "description": "a subscribed change is not sent for an identifier Braze holds as "
        "unsubscribed in that group",
    },
    "lane": {"type": "string", "enum": ["live", "bulk"], "description": "default live"},
    "workspace": {"type": "string", "description": "a name from BRAZE_WORKSPACES_FILE"},
}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


@cache
def openapi_document(max_changes: int) -> dict[str, Any]:
    row = {
        "type": "object",
        "required": ["subscription_group_id", "subscription_state"],
        "additionalProperties": False,
        "properties": {
            name: FIELDS.get(name, {"description": "see the import row format"})
            for name in sorted(KNOWN_FIELDS)
        },
    }
    retry_after = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "braze-subs ingest API",
            "version": "1",
            "description": "Subscription changes into braze-subs' buffer, from any language.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Change": row,
                "Error": {"type": "object", "properties": {"error": {"type": "string"}}},
                "Accepted": {
                    "type": "object",
                    "properties": {
                        "accepted": {"type": "integer", "description": "changes enqueued"},
                        "stale": {
                            "type": "integer",
                            "description": "of those, dropped as older than a change "
                            "already accepted for the group and identifier",
                        },
                    },
                },
                "Invalid": {
                    "type": "object",
                    "properties": {
                        "errors": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "index": {"type": ["integer", "null"]},
                                    "field": {"type": "string"},
                                    "reason": {"type": "string"},
                                },
                            },
                        }
                    },
                },
            },
        },
        "paths": {
            "/v1/changes": {
                "post": {
                    "summary": "Enqueue one change or a list, all or nothing",
                    "security": [{"bearer": []}],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "oneOf": [
                                        {"$ref": "#/components/schemas/Change"},
                                        {
                                            "type": "array",
                                            "maxItems": max_changes,
                                            "items": {"$ref": "#/components/schemas/Change"},
                                        },
                                    ]
                                }
                            }
                        },
                    },
                    "responses": {
                        "202": {
                            "description": "every change enqueued",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Accepted"}
                                }
                            },
                        },
                        "401": _error("no accepted bearer token"),
                        "413": _error(
                            f"body past API_MAX_BODY_BYTES, or more than {max_changes} changes"
                        ),
                        "415": _error("not JSON"),
                        "422": {
                            "description": "invalid rows, every one listed; nothing enqueued",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Invalid"}
                                }
                            },
                        },
                        "503": {
                            **_error(
                                "Redis refuses writes or the buffer is full; nothing enqueued"
                            ),
                            "headers": retry_after,
                        },
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Redis is reachable",
                    "responses": {"200": {"description": "ok"}, "503": {"description": "not"}},
                }
            },
        },
    }
