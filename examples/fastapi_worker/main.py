"""A minimal worker behind wsproxy: it talks only to Redis, never to clients.

    POST /sessions?agent_id=assistant  -> {"session_id", "agent_id", "token", "ws_url", "expires_in"}
        Creates a session: stores its token at session:{id}:auth, where the
        proxy's redis auth mode checks it. The client connects to ws_url with
        "Authorization: Bearer <token>" (or ?token=<token> from a browser).
    POST /sessions/{session_id}/ask  {"prompt": "..."}  -> 202
        Streams a fake LLM answer to session:{id}:down, one
        {"type":"data","payload":"<token>"} message per token, then
        {"type":"control","command":"stream_end"}.

A background task reads every session's up channel (PSUBSCRIBE
session:*:up). A client message holding a "prompt" string is answered like
/ask; any other message is echoed back as {"type":"data","payload":{"echo": ...}}.

Run from the repository root with Debian 12's interpreter, after installing
the packages as root (or with sudo): apt-get install python3-fastapi
python3-uvicorn python3-redis. A pyenv or virtualenv python3 does not see
Debian's packages; in a virtualenv, pip install -r
examples/fastapi_worker/requirements.txt and use its python.

    /usr/bin/python3 -m uvicorn main:app --app-dir examples/fastapi_worker --port 8000

Environment: REDIS_URL (redis://127.0.0.1:6379), WSPROXY_URL
(ws://127.0.0.1:8080, the address clients use), SESSION_TTL_SECS (3600),
TOKEN_DELAY_SECS (0.05, the pause between streamed tokens).

Works with FastAPI 0.92 / redis-py 4.3 (Debian 12) and current releases,
which is why it uses @app.on_event (FastAPI 0.92 has no lifespan argument).
"""

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import uuid

import redis.asyncio as redis
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
WSPROXY_URL = os.environ.get("WSPROXY_URL", "ws://127.0.0.1:8080").rstrip("/")
SESSION_TTL_SECS = int(os.environ.get("SESSION_TTL_SECS", "3600"))
TOKEN_DELAY_SECS = float(os.environ.get("TOKEN_DELAY_SECS", "0.05"))

# The proxy's rule for agent and session ids.
VALID_ID = re.compile(r"[A-Za-z0-9._~-]{1,128}")

log = logging.getLogger("uvicorn.error")
app = FastAPI(title="wsproxy example worker")
state = {}  # "redis": the client; "listener": the task reading up channels
background_tasks = set()  # answers being streamed; asyncio keeps only weak references
session_locks = {}  # session_id -> [asyncio.Lock, users]: one answer at a time per session


class Ask(BaseModel):
    prompt: str


@app.on_event("startup")
async def start() -> None:
    state["redis"] = redis.from_url(REDIS_URL, decode_responses=True)
    state["listener"] = asyncio.create_task(answer_clients())


@app.on_event("shutdown")
async def stop() -> None:
    state["listener"].cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await state["listener"]
    await state["redis"].close()


@app.post("/sessions")
async def create_session(agent_id: str = "assistant") -> dict:
    if not VALID_ID.fullmatch(agent_id):
        raise HTTPException(400, "agent_id must be 1-128 characters of A-Z a-z 0-9 . _ ~ -")
    session_id = str(uuid.uuid4())
    token = secrets.token_urlsafe(32)
    await state["redis"].set(f"session:{session_id}:auth", token, ex=SESSION_TTL_SECS)
    return {
        "session_id": session_id,
        "agent_id": agent_id,
        "token": token,
        "ws_url": f"{WSPROXY_URL}/{agent_id}/ws/{session_id}",
        "expires_in": SESSION_TTL_SECS,
    }


@app.post("/sessions/{session_id}/ask", status_code=202)
async def ask(session_id: str, body: Ask) -> dict:
    if not VALID_ID.fullmatch(session_id) or not await state["redis"].exists(f"session:{session_id}:auth"):
        raise HTTPException(404, "unknown session")
    start_task(stream_answer(session_id, body.prompt))
    return {"status": "streaming"}


async def answer_clients() -> None:
    """Read every session's up channel for the life of the app; reconnect if Redis goes away."""
    while True:
        pubsub = state["redis"].pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.psubscribe("session:*:up")
            async for message in pubsub.listen():
                session_id = message["channel"].split(":")[1]
                start_task(answer(session_id, message["data"]))
        except redis.ConnectionError as error:
            log.warning("lost Redis (%s); subscribing again in 1 s", error)
            await asyncio.sleep(1)
        finally:
            await pubsub.reset()


async def answer(session_id: str, raw: str) -> None:
    """Answer one client message (the proxy only publishes valid JSON)."""
    message = json.loads(raw)
    prompt = message.get("prompt") if isinstance(message, dict) else None
    if isinstance(prompt, str):
        await stream_answer(session_id, prompt)
    else:
        async with one_answer_at_a_time(session_id):
            await publish(session_id, {"type": "data", "payload": {"echo": message}})


async def stream_answer(session_id: str, prompt: str) -> None:
    text = f"You asked: {prompt} Here is a fake answer from the example worker, streamed one token at a time."
    async with one_answer_at_a_time(session_id):
        log.info("streaming an answer to session %s", session_id)
        for token in re.findall(r"\S+\s*", text):
            await publish(session_id, {"type": "data", "payload": token})
            await asyncio.sleep(TOKEN_DELAY_SECS)
        await publish(session_id, {"type": "control", "command": "stream_end"})


async def publish(session_id: str, message: dict) -> None:
    await state["redis"].publish(f"session:{session_id}:down", json.dumps(message, separators=(",", ":")))


@contextlib.asynccontextmanager
async def one_answer_at_a_time(session_id: str):
    """Keep two answers to one session from interleaving their tokens."""
    entry = session_locks.setdefault(session_id, [asyncio.Lock(), 0])
    entry[1] += 1
    try:
        async with entry[0]:
            yield
    finally:
        entry[1] -= 1
        if entry[1] == 0:
            del session_locks[session_id]


def start_task(coroutine) -> None:
    task = asyncio.create_task(coroutine)
    background_tasks.add(task)
    task.add_done_callback(finished)


def finished(task: asyncio.Task) -> None:
    background_tasks.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("answering failed: %r", task.exception())
