"""MCP servers as tool sources: in-process, stdio (a child process) and streamable HTTP."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time

from mcp.server.mcpserver import MCPServer

from swarmoe import Swarm
from swarmoe.swarm import MCPTools
from swarmoe.testing import FakeModel
from swarmoe.testing.fake_model import reply

SERVER_CODE = """
from mcp.server.mcpserver import MCPServer

server = MCPServer("kb")


@server.tool()
def add(a: int, b: int) -> str:
    \"\"\"Add two integers.\"\"\"
    return str(a + b)


@server.tool()
def fail() -> str:
    \"\"\"Always fails.\"\"\"
    raise ValueError("kb is down")
"""


def make_server() -> MCPServer:
    namespace: dict = {}
    exec(SERVER_CODE, namespace)
    return namespace["server"]


def script(body):
    names = {t["function"]["name"] for t in body["tools"]}
    assert {"kb__add", "kb__fail"} <= names
    msgs = body["messages"]
    if msgs[-1]["role"] == "user":
        return reply(tool_calls=[("kb__add", {"a": 2, "b": 40}), ("kb__fail", {})])
    return reply(" / ".join(m["content"] for m in msgs if m["role"] == "tool"))


async def run_with(server, tmp_path) -> str:
    swarm = Swarm(FakeModel(script).backend(), mcp_servers=[MCPTools(server, prefix="kb")],
                  runs_dir=tmp_path)
    result = await swarm.run("use the knowledge base")
    assert result.stats.tool_calls == 2 and result.stats.tool_errors == 1
    return result.answer


async def test_in_process_mcp_server(tmp_path):
    answer = await run_with(make_server(), tmp_path)
    assert answer.startswith("42 / Error: ") and "MCP tool 'fail' failed" in answer


async def test_stdio_mcp_server(tmp_path):
    path = tmp_path / "kb_server.py"
    path.write_text(SERVER_CODE + "\nserver.run()\n")
    answer = await run_with([sys.executable, str(path)], tmp_path)
    assert answer.startswith("42 / Error: ") and "MCP tool 'fail' failed" in answer


async def test_streamable_http_mcp_server(tmp_path):
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = make_server().streamable_http_app()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])),
                              daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        answer = await run_with(f"http://127.0.0.1:{sock.getsockname()[1]}/mcp", tmp_path)
    finally:
        server.should_exit = True
        thread.join(10)
    assert answer.startswith("42 / Error: ") and "MCP tool 'fail' failed" in answer


def test_server_specs_are_recorded_for_resume():
    assert MCPTools("http://h/mcp").spec == "http://h/mcp"
    assert MCPTools(["python", "s.py"]).spec == ["python", "s.py"]
    assert MCPTools(make_server()).spec is None
