"""Drive moat's E2B front with the unmodified official `e2b` Python SDK, as a user would.

    sdk_test.py TEMPLATE                  # every check, against E2B_API_URL / E2B_SANDBOX_URL / E2B_API_KEY
    sdk_test.py start-and-drop SANDBOX_ID # (used by the script itself) start a background command,
                                          # print its pid and exit without closing anything

The environment is what `eval "$(moat e2b env)"` exports. Every step asserts and prints its
duration; the first surprise ends the script with a traceback. What the SDK version under test
lacks is skipped by name, and never for the newest pinned SDK (2.63.0). Sandboxes the script made
are killed on the way out, even when a check failed.
"""

import asyncio
import http.client
import inspect
import io
import os
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib.metadata import version as package_version

from packaging.version import Version

import e2b
from e2b import (
    AsyncSandbox,
    AuthenticationException,
    CommandExitException,
    ConnectionConfig,
    FileType,
    FilesystemEventType,
    InvalidArgumentException,
    NotFoundException,
    PtySize,
    Sandbox,
    SandboxException,
    SandboxQuery,
    SandboxState,
    TimeoutException,
)

SDK = Version(package_version("e2b"))
NEWEST = Version("2.63.0")
HOME = "/home/user"
ENVD_PORT = 49983


def available(feature, present, why):
    """Whether to run `feature`; a skip is printed, and never allowed for the newest SDK."""
    if present:
        return True
    assert SDK < NEWEST, f"{feature}: {why} in e2b {SDK}, the newest pinned SDK; it must be tested"
    print(f"    SKIP {feature}: {why} in e2b {SDK}", flush=True)
    return False


# The steps that failed: a failed step is reported and the script goes on with the next one,
# so that one run shows every failure; the script exits non-zero at the end.
FAILED = []


@contextmanager
def step(name, fatal=False):
    print(f"--- {name}", flush=True)
    start = time.monotonic()
    try:
        yield
    except Exception:  # noqa: BLE001 — printed, recorded, and fails the script at the end
        traceback.print_exc(file=sys.stdout)
        print(f"    FAILED: {name}", flush=True)
        FAILED.append(name)
        if fatal:
            raise
        return
    print(f"    ok in {(time.monotonic() - start) * 1000:.0f} ms", flush=True)


def raises(kinds, fn, *args, **kwargs):
    """Call fn; it must raise one of `kinds`. The exception."""
    try:
        result = fn(*args, **kwargs)
    except kinds as e:
        print(f"    {getattr(fn, '__qualname__', fn)} raised {type(e).__name__}: {str(e)[:160]}", flush=True)
        return e
    except Exception as e:
        raise AssertionError(f"{getattr(fn, '__qualname__', fn)} raised {type(e).__name__}: {e}; expected {kinds}") from e
    raise AssertionError(f"{getattr(fn, '__qualname__', fn)} returned {result!r}; expected it to raise {kinds}")


def wait_until(what, cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except Exception as e:  # a probe that fails now may pass later
            last = e
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last!r})")


def utc(moment):
    """A datetime the SDK parsed, as an aware UTC one (protobuf timestamps come naive)."""
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def seconds_left(end_at):
    return (utc(end_at) - datetime.now(timezone.utc)).total_seconds()


# ---------------------------------------------------------------------------------------------
# Sandboxes: create, get_info, set_timeout, list, pause/resume, kill, errors of the control plane


def create_main(template, run_id, made):
    with step("Sandbox.create(template, timeout, metadata, envs) and get_info", fatal=True):
        s = Sandbox.create(
            template=template,
            timeout=300,
            metadata={"suite": run_id, "role": "main"},
            envs={"FROM_CREATE": "create-env"},
        )
        made.append(s.sandbox_id)
        print(f"    sandbox {s.sandbox_id}, domain {s.sandbox_domain}", flush=True)
        assert s.is_running()
        info = s.get_info()
        assert info.sandbox_id == s.sandbox_id, info
        assert info.metadata == {"suite": run_id, "role": "main"}, info.metadata
        assert template in (info.template_id, info.name), (info.template_id, info.name)
        assert info.state == SandboxState.RUNNING, info.state
        assert info.cpu_count >= 1 and info.memory_mb >= 64, info
        assert 200 < seconds_left(info.end_at) <= 310, (info.started_at, info.end_at)
        assert utc(info.started_at) <= datetime.now(timezone.utc), info.started_at
    with step("set_timeout"):
        s.set_timeout(900)
        left = seconds_left(s.get_info().end_at)
        assert 850 < left <= 910, left
    return s


# Characters the metadata filter must carry through its encoding (the SDK quotes twice).
NOTE = "a b&c=d/é"


def create_second(template, run_id, made):
    with step("a second sandbox"):
        s2 = Sandbox.create(template=template, timeout=300, metadata={"suite": run_id, "role": "second", "note": NOTE})
        made.append(s2.sandbox_id)
        return s2


def list_and_paginate(run_id, s, s2):
    with step("Sandbox.list with a metadata filter and pagination"):

        def pages(query, limit=None):
            paginator = Sandbox.list(query=query, limit=limit)
            got = []
            while paginator.has_next and len(got) < 10:
                got.append(paginator.next_items())
            assert not paginator.has_next, "more than 10 pages"
            return got

        everything = pages(SandboxQuery(metadata={"suite": run_id}))
        listed = {i.sandbox_id: i for page in everything for i in page}
        assert set(listed) == {s.sandbox_id, s2.sandbox_id}, listed
        assert listed[s.sandbox_id].metadata == {"suite": run_id, "role": "main"}, listed[s.sandbox_id]
        assert listed[s.sandbox_id].state == SandboxState.RUNNING
        one_each = pages(SandboxQuery(metadata={"suite": run_id}), limit=1)
        assert all(len(p) <= 1 for p in one_each), [len(p) for p in one_each]
        assert {i.sandbox_id for p in one_each for i in p} == {s.sandbox_id, s2.sandbox_id}, one_each
        assert len([p for p in one_each if p]) == 2, one_each
        only = pages(SandboxQuery(metadata={"suite": run_id, "role": "second"}))
        assert [i.sandbox_id for p in only for i in p] == [s2.sandbox_id], only
        assert listed[s2.sandbox_id].metadata["note"] == NOTE, listed[s2.sandbox_id].metadata
        assert pages(SandboxQuery(metadata={"suite": run_id, "role": "nobody"})) in ([], [[]])
        only = pages(SandboxQuery(metadata={"suite": run_id, "note": NOTE}))
        assert [i.sandbox_id for p in only for i in p] == [s2.sandbox_id], f"filtering by note={NOTE!r}: {only}"


def pause_and_resume(s2):
    with step("pause, then resume through Sandbox.connect"):
        s2.files.write(f"{HOME}/kept.txt", "kept across the pause")
        if hasattr(s2, "pause"):
            assert s2.pause() is True
        else:
            print(f"    e2b {SDK} has no pause(): using beta_pause()", flush=True)
            s2.beta_pause()
        info = Sandbox.get_info(s2.sandbox_id)
        assert info.state == SandboxState.PAUSED, info.state
        assert not s2.is_running()
        if available("pause() of a paused sandbox returns False", hasattr(s2, "pause"), "no pause()"):
            assert s2.pause() is False
        back = Sandbox.connect(s2.sandbox_id)
        assert back.is_running()
        assert Sandbox.get_info(s2.sandbox_id).state == SandboxState.RUNNING
        assert back.files.read(f"{HOME}/kept.txt") == "kept across the pause"
        assert back.commands.run("echo back").stdout == "back\n"


def kill(s):
    with step(f"kill {s.sandbox_id}, and what a killed sandbox answers"):
        assert s.kill() is True
        assert not s.is_running()
        raises(NotFoundException, Sandbox.get_info, s.sandbox_id)
        raises(NotFoundException, Sandbox.connect, s.sandbox_id)
        assert Sandbox.kill(s.sandbox_id) is False
        e = raises(SandboxException, s.commands.run, "true")
        if SDK >= NEWEST:
            assert isinstance(e, e2b.SandboxNotRunningException), type(e)


def control_plane_errors(template):
    with step("errors: a wrong API key, an unknown sandbox"):
        wrong = "e2b_" + "0" * 40
        raises(AuthenticationException, Sandbox.create, template=template, api_key=wrong)
        raises(AuthenticationException, lambda: Sandbox.list(api_key=wrong).next_items())
        e = raises(NotFoundException, Sandbox.connect, "no-such-sandbox")
        if SDK >= NEWEST:
            assert isinstance(e, e2b.SandboxNotFoundException), type(e)
        raises(NotFoundException, Sandbox.get_info, "no-such-sandbox")
        assert Sandbox.kill("no-such-sandbox") is False
        raises(SandboxException, Sandbox.create, template="no-such-template-here")


def envd_errors(s):
    with step("errors: a wrong envd access token"):
        forged_token = "0" * 32
        headers = {"E2b-Sandbox-Id": s.sandbox_id, "E2b-Sandbox-Port": str(ENVD_PORT), "X-Access-Token": forged_token}
        forged = Sandbox(
            sandbox_id=s.sandbox_id,
            sandbox_domain=s.sandbox_domain,
            envd_version=Version("0.5.7"),
            envd_access_token=forged_token,
            connection_config=ConnectionConfig(extra_sandbox_headers=headers),
        )
        raises(AuthenticationException, forged.commands.run, "true")
        raises(AuthenticationException, forged.files.read, f"{HOME}/hello.txt")
        raises(AuthenticationException, forged.files.list, HOME)


# ---------------------------------------------------------------------------------------------
# Commands


def commands(s):
    run = s.commands.run
    with step("commands.run: output, streaming callbacks, exit codes"):
        out, err = [], []
        r = run("echo out; echo err >&2", on_stdout=out.append, on_stderr=err.append)
        assert (r.stdout, r.stderr, r.exit_code) == ("out\n", "err\n", 0), r
        assert ("".join(out), "".join(err)) == ("out\n", "err\n"), (out, err)
        e = raises(CommandExitException, run, "echo partial; echo failing >&2; exit 3")
        assert (e.exit_code, e.stdout, e.stderr) == (3, "partial\n", "failing\n"), e
        # stdin=False (the default) is /dev/null: cat ends at once.
        assert run("cat", timeout=20).stdout == ""
    with step("commands.run: 100000 lines arrive whole, in order"):
        chunks = []
        r = run("seq 1 100000", on_stdout=chunks.append)
        assert r.stdout == "".join(f"{i}\n" for i in range(1, 100001)), r.stdout[-200:]
        assert "".join(chunks) == r.stdout
    with step("commands.run: a slow reader loses nothing (the command waits for it)"):
        stalls = []

        def slow(chunk):
            if len(stalls) < 60:  # about 3 s, long enough for seq to be done many times over
                stalls.append(chunk)
                time.sleep(0.05)

        r = run("seq 1 200000", on_stdout=slow)
        assert r.stdout == "".join(f"{i}\n" for i in range(1, 200001)), (len(r.stdout), r.stdout[-100:])
    with step("commands.run: envs, cwd, user"):
        assert run("echo $FROM_CREATE").stdout == "create-env\n"
        r = run('echo "$ONE $FROM_CREATE"', envs={"ONE": "1", "FROM_CREATE": "overridden"})
        assert r.stdout == "1 overridden\n", r
        assert run("pwd").stdout == f"{HOME}\n"
        assert run("pwd", cwd="/tmp").stdout == "/tmp\n"
        assert run('id -u; echo "$HOME $USER"').stdout == f"1000\n{HOME} user\n"
        assert run('id -u; echo "$HOME $USER"', user="root").stdout == "0\n/root root\n"
        assert run("id -u", user="user").stdout == "1000\n"
    with step("commands.run(timeout=1) of a longer command: TimeoutException, and it is killed"):
        start = time.monotonic()
        e = raises(TimeoutException, run, "sleep 30; echo late", timeout=1)
        if SDK >= NEWEST:
            assert not isinstance(e, e2b.SandboxNotRunningException), e
        assert time.monotonic() - start < 20, time.monotonic() - start
        wait_until(
            "the timed-out command to be gone",
            lambda: not [p for p in s.commands.list() if "sleep 30" in " ".join(p.args)],
        )
    with step("commands.run: a cwd that does not exist"):
        e = raises((InvalidArgumentException, CommandExitException), run, "pwd", cwd="/no/such/dir")
        print(f"    -> {type(e).__name__}", flush=True)
    with step("background=True: wait, list, kill"):
        h = run("sleep 1; echo done", background=True)
        assert isinstance(h.pid, int) and h.pid > 0, h.pid
        r = h.wait()
        assert (r.stdout, r.exit_code) == ("done\n", 0), r
        h = run("sleep 600", background=True, timeout=0, envs={"MARK": "listed"}, cwd="/tmp")
        listed = {p.pid: p for p in s.commands.list()}
        assert h.pid in listed, listed
        p = listed[h.pid]
        assert (p.cmd, p.args) == ("/bin/bash", ["-l", "-c", "sleep 600"]), p
        assert p.envs.get("MARK") == "listed" and p.cwd == "/tmp", p
        assert h.kill() is True
        e = raises(CommandExitException, h.wait)
        assert e.exit_code != 0, e
        wait_until("the killed command to leave the list", lambda: h.pid not in {p.pid for p in s.commands.list()})
        assert s.commands.kill(h.pid) is False
    with step("stdin: send_stdin (and close_stdin)"):
        h = run("head -n 1; echo after", background=True, stdin=True)
        s.commands.send_stdin(h.pid, "line one\nline two\n")
        r = h.wait()
        assert r.stdout == "line one\nafter\n", r
        if available("close_stdin", hasattr(s.commands, "close_stdin"), "no Commands.close_stdin"):
            h = run("wc -c", background=True, stdin=True)
            h.send_stdin("12345")
            h.send_stdin(b"678")
            h.close_stdin()
            r = h.wait()
            assert r.stdout.strip() == "8", r
    with step("commands.connect to a running command"):
        h = run("for i in 1 2 3 4 5 6 7 8; do echo tick $i; sleep 0.5; done", background=True)
        h.disconnect()
        again = s.commands.connect(h.pid)
        r = again.wait()
        assert r.exit_code == 0 and r.stdout.endswith("tick 8\n"), r
        raises(NotFoundException, s.commands.connect, h.pid)


def survives_disconnect(s):
    with step("a background command survives its client going away"):
        child = subprocess.run(
            [sys.executable, __file__, "start-and-drop", s.sandbox_id],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert child.returncode == 0, f"the dropping client failed:\n{child.stdout}\n{child.stderr}"
        pid = int(child.stdout.strip().splitlines()[-1])

        def count():
            try:
                return int(s.files.read("/tmp/alive").strip() or "0")
            except NotFoundException:  # not written yet
                return 0

        wait_until("the orphaned command to start counting", lambda: count() >= 1)
        first = count()
        wait_until("the orphaned command to keep counting", lambda: count() >= first + 3)
        assert pid in {p.pid for p in s.commands.list()}
        h = s.commands.connect(pid)
        for out, _err, _pty in h:
            if out and "tick" in out:
                break
        assert h.kill() is True
        raises(CommandExitException, h.wait)


def start_and_drop(sandbox_id):
    s = Sandbox.connect(sandbox_id)
    h = s.commands.run(
        "i=0; while :; do i=$((i+1)); echo $i > /tmp/alive; echo tick $i; sleep 0.2; done",
        background=True,
        timeout=0,
    )
    print(h.pid, flush=True)
    os._exit(0)  # no goodbye: the connection just goes away


def pty(s):
    with step("pty: create, send input, resize, kill"):
        h = s.pty.create(PtySize(rows=24, cols=80), timeout=0)
        seen = bytearray()
        failures = []

        def read():
            try:
                for _out, _err, data in h:
                    if data:
                        seen.extend(data)
            except Exception as e:  # noqa: BLE001 — reported by the main thread
                failures.append(e)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        s.pty.send_stdin(h.pid, b"stty size; echo term=$TERM\n")
        wait_until("stty to print 24 80", lambda: b"24 80" in seen and b"term=xterm" in seen, timeout=20)
        s.pty.resize(h.pid, PtySize(rows=30, cols=100))
        s.pty.send_stdin(h.pid, b"stty size\n")
        wait_until("stty to print 30 100 after the resize", lambda: b"30 100" in seen, timeout=20)
        assert s.pty.kill(h.pid) is True
        reader.join(20)
        assert not reader.is_alive(), "the pty's stream did not end after kill"
        assert not failures, failures


# ---------------------------------------------------------------------------------------------
# Files


def files(s):
    fs = s.files
    blob = bytes(range(256)) * 4096 + os.urandom(12345)
    with step("files: write and read text, bytes, stream"):
        info = fs.write(f"{HOME}/hello.txt", "hello, moat\n")
        assert (info.path, info.name) == (f"{HOME}/hello.txt", "hello.txt"), info
        assert fs.read(f"{HOME}/hello.txt") == "hello, moat\n"
        fs.write(f"{HOME}/blob.bin", blob)
        assert bytes(fs.read(f"{HOME}/blob.bin", format="bytes")) == blob
        assert b"".join(fs.read(f"{HOME}/blob.bin", format="stream")) == blob
        # The file is the user's, as in E2B: a command running as the user appends to it.
        assert s.commands.run(f"stat -c %u:%g {HOME}/hello.txt").stdout == "1000:1000\n"
        s.commands.run(f"echo more >> {HOME}/hello.txt")
        assert fs.read(f"{HOME}/hello.txt") == "hello, moat\nmore\n"
        # Relative paths are the user's home; parents are made.
        assert fs.write("relative.txt", "rel").path == f"{HOME}/relative.txt"
        assert s.commands.run(f"cat {HOME}/relative.txt").stdout == "rel"
        assert fs.write(f"{HOME}/new/deeper/file.txt", "deep").path == f"{HOME}/new/deeper/file.txt"
        fs.write("/root/root-only.txt", "root's", user="root")
        assert fs.read("/root/root-only.txt", user="root") == "root's"
        assert s.commands.run("stat -c %u /root/root-only.txt", user="root").stdout == "0\n"
        e = raises(NotFoundException, fs.read, f"{HOME}/no-such-file")
        if SDK >= NEWEST:
            assert isinstance(e, e2b.FileNotFoundException), type(e)
    with step("files: write_files (many)"):
        infos = fs.write_files([{"path": f"{HOME}/many/a.txt", "data": "A"}, {"path": f"{HOME}/many/b.bin", "data": b"B\x00"}])
        assert sorted(i.path for i in infos) == [f"{HOME}/many/a.txt", f"{HOME}/many/b.bin"], infos
        assert bytes(fs.read(f"{HOME}/many/b.bin", format="bytes")) == b"B\x00"
    streamed = "gzip" in inspect.signature(fs.write).parameters
    if available("octet-stream and gzip uploads", streamed, "no write(gzip=...)"):
        with step("files: a streamed (octet-stream) and a gzip upload"):
            fs.write(f"{HOME}/streamed.bin", io.BytesIO(blob))
            assert bytes(fs.read(f"{HOME}/streamed.bin", format="bytes")) == blob
            fs.write(f"{HOME}/gzipped.txt", "squeezed " * 1000, gzip=True)
            assert fs.read(f"{HOME}/gzipped.txt") == "squeezed " * 1000
    with step("files: list with depth, exists, get_info"):
        fs.write_files([
            {"path": f"{HOME}/tree/a.txt", "data": "1"},
            {"path": f"{HOME}/tree/sub/b.txt", "data": "22"},
            {"path": f"{HOME}/tree/sub/deep/c.txt", "data": "333"},
        ])
        top = {e.name: e for e in fs.list(f"{HOME}/tree")}
        assert set(top) == {"a.txt", "sub"}, top
        assert top["a.txt"].type == FileType.FILE and top["sub"].type == FileType.DIR, top
        assert (top["a.txt"].path, top["a.txt"].size) == (f"{HOME}/tree/a.txt", 1), top["a.txt"]
        two = {e.path for e in fs.list(f"{HOME}/tree", depth=2)}
        want = {f"{HOME}/tree/{p}" for p in ["a.txt", "sub", "sub/b.txt", "sub/deep"]}
        assert two == want, two
        assert fs.exists(f"{HOME}/tree/sub/b.txt") and not fs.exists(f"{HOME}/tree/nothing")
        i = fs.get_info(f"{HOME}/tree/sub/b.txt")
        assert (i.name, i.type, i.size, i.path) == ("b.txt", FileType.FILE, 2, f"{HOME}/tree/sub/b.txt"), i
        assert (i.owner, i.group) == ("user", "user") and i.permissions.startswith("-rw"), i
        assert abs((datetime.now(timezone.utc) - utc(i.modified_time)).total_seconds()) < 600, i.modified_time
        assert fs.get_info(f"{HOME}/tree/sub").type == FileType.DIR
        raises(NotFoundException, fs.get_info, f"{HOME}/tree/nothing")
        raises(NotFoundException, fs.list, f"{HOME}/no-such-dir")
    with step("files: make_dir, rename, remove"):
        assert fs.make_dir(f"{HOME}/made/inner") is True
        assert fs.make_dir(f"{HOME}/made/inner") is False
        assert fs.get_info(f"{HOME}/made/inner").type == FileType.DIR
        moved = fs.rename(f"{HOME}/tree/a.txt", f"{HOME}/tree/renamed.txt")
        assert (moved.path, moved.name) == (f"{HOME}/tree/renamed.txt", "renamed.txt"), moved
        assert not fs.exists(f"{HOME}/tree/a.txt") and fs.read(f"{HOME}/tree/renamed.txt") == "1"
        raises(NotFoundException, fs.rename, f"{HOME}/tree/a.txt", f"{HOME}/tree/x.txt")
        fs.remove(f"{HOME}/tree/renamed.txt")
        assert not fs.exists(f"{HOME}/tree/renamed.txt")
        fs.remove(f"{HOME}/tree")
        assert not fs.exists(f"{HOME}/tree")

    with step("files: signed download_url and upload_url work without any header"):
        import urllib.request
        import urllib.error
        fs.write(f"{HOME}/signed.txt", "signed bytes")
        with urllib.request.urlopen(s.download_url(f"{HOME}/signed.txt"), timeout=30) as r:
            assert r.read() == b"signed bytes"
        with urllib.request.urlopen(s.download_url(f"{HOME}/signed.txt", use_signature_expiration=60), timeout=30) as r:
            assert r.read() == b"signed bytes"
        boundary = "moat-test-boundary"
        body = (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"up.txt\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\nuploaded\r\n--{boundary}--\r\n"
        ).encode()
        req = urllib.request.Request(
            s.upload_url(f"{HOME}/up.txt"), data=body, method="POST",
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200
        assert fs.read(f"{HOME}/up.txt") == "uploaded"
        # A download URL does not upload, an expired one does nothing, a forged one names no sandbox.
        def refused(url, **kw):
            try:
                urllib.request.urlopen(urllib.request.Request(url, **kw), timeout=30)
            except urllib.error.HTTPError as e:
                return e.code
            raise AssertionError(f"{url} was accepted")
        assert refused(s.download_url(f"{HOME}/up.txt"), data=body, method="POST",
                       headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}) in (401, 404)
        assert refused(s.download_url(f"{HOME}/signed.txt", use_signature_expiration=-10)) in (401, 404)
        forged = s.download_url(f"{HOME}/signed.txt").replace("signature=v1_", "signature=v1_x")
        assert refused(forged) in (401, 404)


def watch_polling(s):
    with step("files.watch_dir (sync: polling)"):
        d = f"{HOME}/watched"
        s.files.make_dir(d)
        w = s.files.watch_dir(d)
        s.files.write(f"{d}/x.txt", "x")
        s.commands.run(f"mv {d}/x.txt {d}/y.txt && rm {d}/y.txt")
        seen = []

        def complete():
            seen.extend((e.name, e.type) for e in w.get_new_events())
            return {("x.txt", FilesystemEventType.CREATE), ("x.txt", FilesystemEventType.RENAME),
                    ("y.txt", FilesystemEventType.CREATE), ("y.txt", FilesystemEventType.REMOVE)} <= set(seen)

        wait_until("create, rename and remove events", complete, timeout=20)
        assert ("x.txt", FilesystemEventType.WRITE) in seen, seen
        w.stop()


async def async_checks(sandbox_id):
    s = await AsyncSandbox.connect(sandbox_id)
    r = await s.commands.run("echo from async")
    assert r.stdout == "from async\n", r
    d = f"{HOME}/async-watched"
    await s.files.make_dir(d)
    events = []
    handle = await s.files.watch_dir(d, on_event=events.append, timeout=0)
    # Older SDKs return before the server has the watch: write until an event shows.
    for n in range(40):
        await s.files.write(f"{d}/z{n}.txt", "z")
        await asyncio.sleep(0.5)
        if any(e.type == FilesystemEventType.CREATE for e in events):
            break
    names = {e.name for e in events if e.type == FilesystemEventType.CREATE}
    assert names and all(n.startswith("z") and n.endswith(".txt") for n in names), events
    await handle.stop()


def watch_streaming(s):
    with step("files.watch_dir (async: streaming), AsyncSandbox"):
        asyncio.run(async_checks(s.sandbox_id))


# ---------------------------------------------------------------------------------------------
# A server in the guest, reached through get_host(port)


def guest_server(s):
    with step("get_host(port): a server in the guest answers through the front"):
        s.commands.run(f"mkdir -p {HOME}/www && echo hello-from-the-guest > {HOME}/www/index.html")
        server = s.commands.run(f"httpd -f -p 8080 -h {HOME}/www", background=True, timeout=0)
        host = s.get_host(8080)
        assert host.startswith(f"8080-{s.sandbox_id}."), host
        url = urllib.parse.urlsplit(os.environ["E2B_SANDBOX_URL"])

        def get(headers):
            c = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
            try:
                c.request("GET", "/index.html", headers=headers)
                r = c.getresponse()
                return r.status, r.read()
            finally:
                c.close()

        if s.traffic_access_token:
            auth, how = {"e2b-traffic-access-token": s.traffic_access_token}, "e2b-traffic-access-token"
        else:
            auth, how = {"X-Access-Token": s._envd_access_token}, "X-Access-Token (no traffic token given)"
        print(f"    get_host(8080) = {host}; authenticated with {how}", flush=True)
        wait_until("the guest's httpd to answer", lambda: get({"Host": host, **auth})[0] == 200)
        assert get({"Host": host, **auth}) == (200, b"hello-from-the-guest\n")
        by_header = {"E2b-Sandbox-Id": s.sandbox_id, "E2b-Sandbox-Port": "8080", **auth}
        assert get(by_header) == (200, b"hello-from-the-guest\n")
        assert get({"Host": host, "X-Access-Token": s._envd_access_token}) == (200, b"hello-from-the-guest\n")
        status, body = get({"Host": host})
        assert status == 401, (status, body)
        status, body = get({"Host": host, "e2b-traffic-access-token": "0" * 32})
        assert status == 401, (status, body)
        status, body = get({"Host": s.get_host(8081), **auth})
        assert status == 502 and b"port is not open" in body, (status, body)
        assert server.kill() is True


# ---------------------------------------------------------------------------------------------


def main(template):
    for var in ["E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY"]:
        assert os.environ.get(var), f"{var} is not set: run eval \"$(moat e2b env)\" first"
    print(f"e2b {SDK}; API {os.environ['E2B_API_URL']}; sandboxes {os.environ['E2B_SANDBOX_URL']}", flush=True)
    run_id = uuid.uuid4().hex[:12]
    made = []

    def section(check, *args):
        """Run one group of checks; what fails outside its steps is reported like a failed step."""
        try:
            return check(*args)
        except Exception:  # noqa: BLE001 — printed, recorded, and fails the script at the end
            traceback.print_exc(file=sys.stdout)
            sys.stdout.flush()
            FAILED.append(check.__name__)
            return None

    try:
        section(control_plane_errors, template)
        s = create_main(template, run_id, made)  # nothing else can run without it
        for check in [commands, survives_disconnect, pty, files, watch_polling, watch_streaming, guest_server,
                      envd_errors]:
            section(check, s)
        s2 = section(create_second, template, run_id, made)
        if s2 is not None:
            section(list_and_paginate, run_id, s, s2)
            section(pause_and_resume, s2)
            section(kill, s2)
        section(kill, s)
    finally:
        for sandbox_id in made:
            try:
                Sandbox.kill(sandbox_id)
            except Exception as e:  # noqa: BLE001 — best effort; the test reports leftovers
                print(f"cleanup: killing {sandbox_id} failed: {e!r}", flush=True)
    if FAILED:
        print(f"FAILED with e2b {SDK}:\n  " + "\n  ".join(FAILED), flush=True)
        sys.exit(1)
    print("ok", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["start-and-drop"]:
        start_and_drop(sys.argv[2])
    else:
        main(sys.argv[1])
