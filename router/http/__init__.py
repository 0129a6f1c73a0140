"""The OpenAI-compatible HTTP front door of the router: a sibling of router/server.py (gRPC) on
the same request flow, in the same process and event loop.

A request's path: `app.py` (FastAPI routes, the API-key check, `body_limit.py`) -> `schemas.py`
(the pydantic body) -> `requests.py` (body and headers, `tandem_fields.py`, `structured.py`,
`chat_tools.py` -> one `router.request.GenerateRequest` per choice) -> `door.py` ->
`fanout.py` (the choices' flows side by side, merged, with the deadline) -> `choices.py`
(batches -> OpenAI's pieces; tools through `tools.py`) -> `streaming.py` (server-sent events)
or `responses.py` (one JSON). `errors.py` maps the router's `ErrorKind` to HTTP statuses and
OpenAI's error object; `disconnect.py` stops work whose client left; `serving.py` runs uvicorn
as a task on the router's loop. Imports fastapi and uvicorn; never torch.
"""
