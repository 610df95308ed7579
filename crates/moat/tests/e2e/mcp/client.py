"""Drive moat's MCP server with the official MCP Python SDK, as an agent would.

    client.py stdio MOAT_BINARY HOST_DIR     # `moat mcp` over stdio (MOAT_HOME from the env)
    client.py http URL TOKEN_FILE            # the daemon's /mcp endpoint (streamable HTTP)

Every step asserts; the script exits non-zero at the first surprise. It prints one line per
tool call with its duration, so a failure shows what happened before it.
"""

import asyncio
import json
import os
import sys
import time
import urllib.request

import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

EXPECTED_TOOLS = {
    "sandbox_create", "sandbox_list", "sandbox_info", "sandbox_stop", "sandbox_start",
    "sandbox_pause",
    "sandbox_destroy", "sandbox_snapshot", "sandbox_revert", "sandbox_fork", "sandbox_logs",
    "sandbox_exec", "sandbox_process_start", "sandbox_process_poll", "sandbox_process_kill",
    "sandbox_file_read", "sandbox_file_write", "sandbox_file_edit", "sandbox_file_list",
    "sandbox_upload", "sandbox_download", "sandbox_network", "sandbox_ports",
}


def text(result):
    return "".join(c.text for c in result.content if getattr(c, "type", "") == "text")


async def call(client, name, args=None, error=False):
    """Call a tool; it must succeed (or, with error=True, fail as a tool error). Its text."""
    start = time.monotonic()
    result = await client.call_tool(name, args or {})
    took = time.monotonic() - start
    out = text(result)
    first = out.splitlines()[0] if out else ""
    print(f"{took * 1000:8.0f} ms  {name} {json.dumps(args)[:90]} -> {'ERROR ' if result.is_error else ''}{first[:90]}",
          flush=True)
    if error:
        assert result.is_error, f"{name} {args} should fail as a tool error, got: {out}"
    else:
        assert not result.is_error, f"{name} {args} failed: {out}"
    return out


def stdio_client(moat, args, cwd):
    params = StdioServerParameters(command=moat, args=["mcp", *args], env=dict(os.environ), cwd=cwd)
    return Client(params)


async def tools_are_described(client):
    listed = (await client.list_tools()).tools
    names = {t.name for t in listed}
    assert names == EXPECTED_TOOLS, f"tools: {sorted(names ^ EXPECTED_TOOLS)} differ"
    for t in listed:
        assert t.description and len(t.description) > 40, f"{t.name} needs a description"
        schema = t.input_schema
        assert schema.get("type") == "object", f"{t.name}: {schema}"
        for prop, spec in schema.get("properties", {}).items():
            assert spec.get("description"), f"{t.name}.{prop} has no description"
    exec_tool = next(t for t in listed if t.name == "sandbox_exec")
    assert set(exec_tool.input_schema["required"]) == {"sandbox", "command"}, exec_tool.input_schema


async def malformed_calls_are_tool_errors(client, box):
    out = await call(client, "sandbox_exec", {"sandbox": 5, "command": "true"}, error=True)
    assert "sandbox" in out, out
    out = await call(client, "sandbox_exec", {"sandbox": box}, error=True)
    assert "command" in out, out
    out = await call(client, "sandbox_exec", {"sandbox": box, "command": "true", "timeout": 5}, error=True)
    assert "timeout" in out, out
    out = await call(client, "sandbox_exec", {"sandbox": "no-such-box", "command": "true"}, error=True)
    assert "no sandbox" in out and "hint:" in out, out
    out = await call(client, "sandbox_exec", {"sandbox": box, "command": "true", "timeout_seconds": 0}, error=True)
    assert "timeout_seconds" in out, out
    out = await call(client, "sandbox_fork", {"sandbox": box, "count": "two"}, error=True)
    out = await call(client, "sandbox_file_read", {"sandbox": box, "path": "relative.txt"}, error=True)
    assert "absolute" in out, out
    out = await call(client, "sandbox_file_read", {"sandbox": box, "path": "/no/such/file"}, error=True)
    # The server keeps working after all of that.
    assert "still here" in await call(client, "sandbox_exec", {"sandbox": box, "command": "echo still here"})


async def stdio(moat, host_dir):
    with open(os.path.join(host_dir, "input.txt"), "w") as f:
        f.write("from the host\n")
    async with stdio_client(moat, ["--max-sandboxes", "3"], host_dir) as client:
        print(f"protocol {client.protocol_version}, server {client.server_info}", flush=True)
        assert "sandbox_create" in (client.instructions or ""), client.instructions
        await tools_are_described(client)

        # Other people's sandboxes are hidden.
        assert "cli-box" not in await call(client, "sandbox_list")
        out = await call(client, "sandbox_info", {"sandbox": "cli-box"}, error=True)
        assert "--all-sandboxes" in out, out

        made = json.loads(await call(client, "sandbox_create", {"name": "mcp-box", "memory_mib": 256}))
        assert made["name"] == "mcp-box" and made["phase"] == "running" and made["owned_by_this_session"], made
        box = "mcp-box"

        out = await call(client, "sandbox_exec", {"sandbox": box, "command": "echo hello; echo oops >&2; exit 3"})
        assert out.startswith("exit code 3\n") and "--- stdout ---\nhello\n" in out and "--- stderr ---\noops\n" in out, out
        out = await call(client, "sandbox_exec", {"sandbox": box, "command": "tr a-z A-Z", "stdin": "shout"})
        assert "SHOUT" in out, out
        out = await call(client, "sandbox_exec", {"sandbox": box, "command": "echo $GREETING from $(pwd)",
                                                   "env": {"GREETING": "hi"}, "cwd": "/tmp"})
        assert "hi from /tmp" in out, out
        out = await call(client, "sandbox_exec", {"sandbox": box, "command": "seq 1 20000", "max_output_bytes": 1000})
        assert out.startswith("exit code 0\n--- stdout ---\n1\n2\n3\n") and out.rstrip().endswith("\n20000"), out
        assert "bytes of output left out here" in out and len(out) < 1500, out
        out = await call(client, "sandbox_exec", {"sandbox": box, "command": "sleep 30", "timeout_seconds": 1})
        assert out.startswith("timed out after 1 s"), out

        # Files: write, read, edit (and edits that must fail leave the file alone), list.
        source = "def f():\n    return 1\n\ndef g():\n    return 1\n"
        await call(client, "sandbox_file_write", {"sandbox": box, "path": "/root/work/app.py", "content": source})
        assert await call(client, "sandbox_file_read", {"sandbox": box, "path": "/root/work/app.py"}) == source
        out = await call(client, "sandbox_file_read", {"sandbox": box, "path": "/root/work/app.py", "offset": 4, "limit": 1})
        assert out.startswith("def g():\n") and "offset 5" in out, out
        out = await call(client, "sandbox_file_edit", {"sandbox": box, "path": "/root/work/app.py",
                                                        "old_string": "return 1", "new_string": "return 2"}, error=True)
        assert "occurs 2 times" in out and "replace_all" in out, out
        out = await call(client, "sandbox_file_edit", {"sandbox": box, "path": "/root/work/app.py",
                                                        "old_string": "return 7", "new_string": "x"}, error=True)
        assert "not found" in out, out
        assert await call(client, "sandbox_file_read", {"sandbox": box, "path": "/root/work/app.py"}) == source
        out = await call(client, "sandbox_file_edit", {"sandbox": box, "path": "/root/work/app.py",
                                                        "old_string": "def g():\n    return 1", "new_string": "def g():\n    return 2"})
        assert "replaced 1 occurrence" in out and "return 2" in out, out
        edited = await call(client, "sandbox_file_read", {"sandbox": box, "path": "/root/work/app.py"})
        assert edited == source.replace("def g():\n    return 1", "def g():\n    return 2"), edited
        await call(client, "sandbox_file_write", {"sandbox": box, "path": "/root/work/run.sh",
                                                  "content": "#!/bin/sh\necho ran\n", "mode": "755"})
        assert "ran" in await call(client, "sandbox_exec", {"sandbox": box, "command": "/root/work/run.sh"})
        listing = await call(client, "sandbox_file_list", {"sandbox": box, "path": "/root/work"})
        assert "- 0755" in listing and "/root/work/app.py" in listing, listing

        # Host files: only under the allowed directory.
        await call(client, "sandbox_upload", {"host_path": "input.txt", "sandbox": box, "path": "/root/work"})
        assert "from the host" in await call(client, "sandbox_file_read", {"sandbox": box, "path": "/root/work/input.txt"})
        await call(client, "sandbox_download", {"sandbox": box, "path": "/root/work", "host_path": "back"})
        with open(os.path.join(host_dir, "back", "app.py")) as f:
            assert f.read() == edited
        out = await call(client, "sandbox_upload", {"host_path": "/etc/passwd", "sandbox": box, "path": "/root"}, error=True)
        assert "outside" in out and "--host-dir" in out, out

        # Background processes: output since the last poll, the end, kill.
        out = await call(client, "sandbox_process_start", {"sandbox": box,
                          "command": "for i in 1 2 3; do echo tick $i; sleep 1; done; echo done >&2"})
        pid = int(out.split("pid ")[1].split()[0])
        out = await call(client, "sandbox_process_poll", {"sandbox": box, "pid": pid, "wait_seconds": 20})
        assert "exit code 0" in out and "tick 1\ntick 2\ntick 3" in out and "done" in out, out
        out = await call(client, "sandbox_process_poll", {"sandbox": box, "pid": pid})
        assert "(no new output)" in out, out
        out = await call(client, "sandbox_process_start", {"sandbox": box, "command": "echo started; sleep 1000"})
        sleeper = int(out.split("pid ")[1].split()[0])
        out = await call(client, "sandbox_process_poll", {"sandbox": box, "pid": sleeper, "wait_seconds": 1})
        assert "still running" in out and "started" in out, out
        listed = json.loads(await call(client, "sandbox_process_poll", {"sandbox": box}))
        assert {p["pid"] for p in listed} == {pid, sleeper}, listed
        await call(client, "sandbox_process_kill", {"sandbox": box, "pid": sleeper})
        out = await call(client, "sandbox_process_poll", {"sandbox": box, "pid": sleeper, "wait_seconds": 10})
        assert "killed by signal 15" in out, out

        # Snapshot, change, revert; fork.
        snap = json.loads(await call(client, "sandbox_snapshot", {"sandbox": box, "name": "clean"}))
        assert snap["reference"] == "mcp-box:clean", snap
        await call(client, "sandbox_file_write", {"sandbox": box, "path": "/root/later.txt", "content": "later"})
        await call(client, "sandbox_revert", {"sandbox": box, "snapshot": "clean"})
        out = await call(client, "sandbox_exec", {"sandbox": box, "command": "ls /root/later.txt"})
        assert "No such file" in out, out
        forked = json.loads(await call(client, "sandbox_fork", {"sandbox": box, "count": 1, "name_prefix": "mcp-fork-"}))
        fork = forked["sandboxes"][0]["name"]
        assert fork == "mcp-fork-1" and forked["sandboxes"][0]["expires_in_secs"] > 0, forked
        assert "return 2" in await call(client, "sandbox_file_read", {"sandbox": fork, "path": "/root/work/app.py"})
        info = json.loads(await call(client, "sandbox_info", {"sandbox": box}))
        assert "mcp-box:clean" in [s["reference"] for s in info["snapshots"]], info
        assert await call(client, "sandbox_logs", {"sandbox": box, "lines": 20})

        await malformed_calls_are_tool_errors(client, box)
        out = await call(client, "sandbox_create", {"memory_mib": 262144}, error=True)
        assert "over this MCP server's limit of 4096" in out and "`moat mcp --max-memory`" in out, out

        # The session's sandbox limit (3 here): a third one fits, a fourth does not.
        await call(client, "sandbox_create", {"name": "mcp-third", "memory_mib": 256})
        out = await call(client, "sandbox_create", {"memory_mib": 256}, error=True)
        assert "at most 3 sandboxes" in out and "--max-sandboxes" in out, out
        names = {s["name"] for s in json.loads(await call(client, "sandbox_list"))}
        assert names == {"mcp-box", "mcp-fork-1", "mcp-third"}, names

        # Network: an allowlist changed live, and a port forward to a guest web server.
        out = json.loads(await call(client, "sandbox_network", {"sandbox": box}))
        assert out["mode"] == "default", out
        out = await call(client, "sandbox_network", {"sandbox": box, "allow_add": ["pypi.org"]}, error=True)
        assert "has no allowlist" in out, out
        out = await call(client, "sandbox_create", {"network": "sideways", "memory_mib": 256}, error=True)
        assert "not a mode" in out, out
        await call(client, "sandbox_exec", {"sandbox": box, "command":
                   "mkdir -p /www && echo via-mcp > /www/index.html && busybox httpd -p 8000 -h /www"})
        line = await call(client, "sandbox_ports", {"sandbox": box, "add": "0:8000"})
        port = int(line.split(" -> ")[0].rsplit(":", 1)[1])
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read().decode()
        assert body == "via-mcp\n", body
        assert await call(client, "sandbox_ports", {"sandbox": box}) == line
        await call(client, "sandbox_ports", {"sandbox": box, "remove": port})
        assert await call(client, "sandbox_ports", {"sandbox": box}) == ""

        # Pause keeps the running process and the file; start continues it.
        await call(client, "sandbox_file_write", {"sandbox": "mcp-third", "path": "/root/kept", "content": "kept"})
        out = await call(client, "sandbox_process_start", {"sandbox": "mcp-third", "command": "sleep 1000"})
        sleeper = int(out.split("pid ")[1].split()[0])
        await call(client, "sandbox_pause", {"sandbox": "mcp-third"})
        out = await call(client, "sandbox_exec", {"sandbox": "mcp-third", "command": "true"}, error=True)
        assert "paused" in out, out
        await call(client, "sandbox_start", {"sandbox": "mcp-third"})
        out = await call(client, "sandbox_process_poll", {"sandbox": "mcp-third", "pid": sleeper})
        assert "still running" in out, out
        assert await call(client, "sandbox_file_read", {"sandbox": "mcp-third", "path": "/root/kept"}) == "kept"
        await call(client, "sandbox_stop", {"sandbox": "mcp-third"})
        await call(client, "sandbox_destroy", {"sandbox": "mcp-third"})
        await call(client, "sandbox_destroy", {"sandbox": fork})
        # mcp-box is left for the end of the session to remove.

    # A session that may see everything, with a low command rate.
    async with stdio_client(moat, ["--all-sandboxes", "--exec-rate", "2"], host_dir) as client:
        names = {s["name"] for s in json.loads(await call(client, "sandbox_list"))}
        assert names == {"cli-box"}, f"the first session's sandboxes are gone, the CLI's is visible: {names}"
        await call(client, "sandbox_exec", {"sandbox": "cli-box", "command": "true"})
        await call(client, "sandbox_exec", {"sandbox": "cli-box", "command": "true"})
        out = await call(client, "sandbox_exec", {"sandbox": "cli-box", "command": "true"}, error=True)
        assert "2 commands a minute" in out and "--exec-rate" in out, out


def shortest_prefix(of, others):
    """The shortest prefix of `of` that none of `others` starts with."""
    for n in range(1, len(of) + 1):
        if not any(o.startswith(of[:n]) for o in others):
            return of[:n]
    raise AssertionError(f"{of} is a prefix of one of {others}")


async def snapshots_of_other_sessions_are_out_of_reach(a, b, api):
    """Session a snapshots its sandbox; b cannot start from it by reference, id or id prefix, and
    gets the very answer a missing snapshot gets (no oracle for guessing ids)."""
    await call(a, "sandbox_snapshot", {"sandbox": "http-box", "name": "private"})
    every = api("/v1/snapshots")
    snap = next(s for s in every if s["sandbox_name"] == "http-box" and s["name"] == "private")
    prefix = shortest_prefix(snap["id"], [s["id"] for s in every if s["kind"] == "template"])
    missing = await call(b, "sandbox_create", {"from_snapshot": "gone-box:private"}, error=True)
    assert "no snapshot" in missing, missing
    for ref in ["http-box:private", snap["id"], prefix]:
        out = await call(b, "sandbox_create", {"from_snapshot": ref}, error=True)
        assert out.replace(json.dumps(ref), "REF") == missing.replace(json.dumps("gone-box:private"), "REF"), (ref, out)
    # Its owner may.
    made = json.loads(await call(a, "sandbox_create", {"from_snapshot": prefix}))
    assert made["phase"] == "running", made
    await call(a, "sandbox_destroy", {"sandbox": made["name"]})


async def the_operators_limits_hold(a, b):
    """Port forwards stay on loopback, and sandboxes stay within the size caps, by default."""
    out = await call(b, "sandbox_create", {"ports": ["0.0.0.0:0:80"], "memory_mib": 256}, error=True)
    assert "loopback only" in out and "moat serve --mcp-allow-public-ports" in out, out
    out = await call(b, "sandbox_create", {"memory_mib": 262144}, error=True)
    assert "moat serve --mcp-max-memory" in out and "MOAT_MCP_MAX_MEMORY" in out, out
    out = await call(b, "sandbox_create", {"cpus": 64, "memory_mib": 256}, error=True)
    assert "moat serve --mcp-max-cpus" in out, out
    out = await call(a, "sandbox_ports", {"sandbox": "http-box", "add": "0.0.0.0:0:8000"}, error=True)
    assert "loopback only" in out, out
    assert "no sandboxes" in await call(b, "sandbox_list"), "nothing was created"


async def http(url, token_file):
    with open(token_file) as f:
        token = f.read().strip()

    def api(path):
        base = url.rsplit("/mcp", 1)[0]
        req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {token}"})
        return json.loads(urllib.request.urlopen(req, timeout=30).read())

    def session():
        http_client = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"},
                                         timeout=httpx2.Timeout(30, read=300))
        return Client(streamable_http_client(url, http_client=http_client))

    async with session() as a, session() as b:
        print(f"protocol {a.protocol_version}", flush=True)
        await tools_are_described(a)
        made = json.loads(await call(a, "sandbox_create", {"name": "http-box", "memory_mib": 256}))
        assert made["phase"] == "running", made
        out = await call(a, "sandbox_exec", {"sandbox": "http-box", "command": "uname -s"})
        assert "Linux" in out, out
        # Another session does not see it.
        assert "http-box" not in await call(b, "sandbox_list")
        await call(b, "sandbox_info", {"sandbox": "http-box"}, error=True)
        await malformed_calls_are_tool_errors(a, "http-box")
        await the_operators_limits_hold(a, b)
        await snapshots_of_other_sessions_are_out_of_reach(a, b, api)
        out = await call(a, "sandbox_upload", {"host_path": "x", "sandbox": "http-box", "path": "/root"}, error=True)
        assert "moat serve --mcp-host-dir" in out, out

    # Without the token the endpoint answers 401.
    async with httpx2.AsyncClient() as plain:
        r = await plain.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        assert r.status_code == 401, r.status_code


def main():
    mode = sys.argv[1]
    if mode == "stdio":
        asyncio.run(stdio(sys.argv[2], sys.argv[3]))
    elif mode == "http":
        asyncio.run(http(sys.argv[2], sys.argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode}")
    print("ok", flush=True)


if __name__ == "__main__":
    main()
