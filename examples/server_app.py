"""Many concurrent streams from one async client inside a Starlette app (any ASGI server).

    MIXTRAL_PROVIDER=nvidia NVIDIA_API_KEY=nvapi-... uvicorn examples.server_app:app
    curl -N 'localhost:8000/ask?q=Why+is+the+sea+salty'

One AsyncMixtralClient serves every request: hosted backends share its connection pool, local weights share
one running batch. A caller that hangs up closes its stream, which frees the connection (or the batch row).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from mixtral_client import AsyncMixtralClient

client = AsyncMixtralClient()


async def ask(request: Request) -> StreamingResponse:
    question = request.query_params.get("q", "Say hello.")
    stream = await client.chat.completions.create(messages=[{"role": "user", "content": question}],
                                                  max_tokens=200, stream=True)

    async def body() -> AsyncIterator[str]:
        async with stream:
            async for text in stream.text():
                yield text

    return StreamingResponse(body(), media_type="text/plain")


@asynccontextmanager
async def lifespan(_app: Starlette) -> AsyncIterator[None]:
    yield
    await client.aclose()


app = Starlette(routes=[Route("/ask", ask)], lifespan=lifespan)
