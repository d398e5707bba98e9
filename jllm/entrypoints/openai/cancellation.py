"""Aborting requests whose client has gone (vLLM's with_cancellation).

A handler runs beside a task that waits for the client's `http.disconnect`; whichever
ends first cancels the other. Cancelling the handler cancels its engine generator,
which aborts the request and frees its KV pages. Streaming responses need no wrapper:
Starlette cancels the body iterator itself when the client disconnects.
"""

from __future__ import annotations

import asyncio
import functools

from fastapi import Request


async def listen_for_disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def with_cancellation(handler):
    """Decorates an endpoint taking `raw_request: Request`; returns None to a client that
    has already gone."""

    @functools.wraps(handler)
    async def wrapper(*args, **kwargs):
        raw_request = kwargs["raw_request"]
        handler_task = asyncio.create_task(handler(*args, **kwargs))
        disconnect_task = asyncio.create_task(listen_for_disconnect(raw_request))
        try:
            done, _ = await asyncio.wait([handler_task, disconnect_task], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (handler_task, disconnect_task):
                if not task.done():
                    task.cancel()
        if handler_task in done:
            return handler_task.result()
        await asyncio.gather(handler_task, return_exceptions=True)
        return None

    return wrapper
