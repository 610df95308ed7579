//! What no SDK sends, byte by byte: broken Connect envelopes, absurd frame lengths, unknown
//! methods, missing and wrong headers and tokens, bodies too large. Each must get a clean error
//! (a JSON body the SDKs can parse, at once) and leave the daemon serving.

use super::wire::{chunked, envelope, request, request_streaming_body, Reply};
use super::*;

/// A sandbox made through the raw control plane.
struct Made {
    id: String,
    token: String,
}

/// Removes the sandboxes a test made, even when it failed (through the CLI: never panics).
struct RemoveAfter<'a>(&'a Front, Vec<String>);

impl Drop for RemoveAfter<'_> {
    fn drop(&mut self) {
        for id in &self.1 {
            let _ = moat_in(&self.0.home).args(["rm", "-f", id]).stdin(Stdio::null()).output();
        }
    }
}

fn create(front: &Front, path: &str) -> Made {
    let body = format!(r#"{{"templateID":"{TEMPLATE}","timeout":300,"metadata":{{"suite":"wire"}}}}"#);
    let headers = [("X-API-KEY", front.key.as_str()), ("Content-Type", "application/json")];
    let r = request(front.addr, "POST", path, &headers, body.as_bytes());
    assert_eq!(r.status, 201, "create through POST {path}: {r}");
    let j = r.json();
    let field =
        |name: &str| j[name].as_str().unwrap_or_else(|| panic!("no {name} in the create answer: {r}")).to_string();
    Made { id: field("sandboxID"), token: field("envdAccessToken") }
}

/// A request to a sandbox's envd (port 49983), with the headers the SDK sends, or fewer.
fn envd(front: &Front, sandbox: &str, token: Option<&str>, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut all = vec![("E2b-Sandbox-Id", sandbox), ("E2b-Sandbox-Port", "49983"), ("Connect-Protocol-Version", "1")];
    if let Some(token) = token {
        all.push(("X-Access-Token", token));
    }
    all.extend_from_slice(headers);
    request(front.addr, "POST", path, &all, body)
}

const JSON: (&str, &str) = ("Content-Type", "application/json");
const STREAM: (&str, &str) = ("Content-Type", "application/connect+json");

/// A Connect error, in either shape the SDKs read: a unary-style JSON error with a 4xx/5xx
/// status, or a stream (200) whose end-stream envelope carries the error. Its code and message.
fn connect_error(case: &str, r: &Reply) -> (String, String) {
    let content_type = r.header("content-type").unwrap_or_default();
    let error = if r.status == 200 && content_type.starts_with("application/connect+json") {
        let frames = r.envelopes();
        let (flags, last) = frames.last().unwrap_or_else(|| panic!("{case}: an empty stream: {r}"));
        assert!(flags & 2 != 0, "{case}: the stream has no end-stream envelope: {r}");
        last["error"].clone()
    } else {
        assert!((400..600).contains(&r.status), "{case}: answered {r}");
        assert!(content_type.starts_with("application/json"), "{case}: the error is not JSON: {r}");
        r.json()
    };
    let message = error["message"].as_str().unwrap_or_else(|| panic!("{case}: an error without a message: {r}"));
    let code = match &error["code"] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        _ => panic!("{case}: an error without a code: {r}"),
    };
    eprintln!("{case:<58} -> {} {code}: {}", r.status, message.chars().take(110).collect::<String>());
    (code, message.to_string())
}

/// A control-plane (or `/files`) error: exactly `status`, and the JSON the SDK's `Error` model
/// needs (`code` = the status as a number, `message`).
fn plain_error(case: &str, r: &Reply, statuses: &[u16]) {
    assert!(statuses.contains(&r.status), "{case}: expected one of {statuses:?}, got {r}");
    assert!(r.header("content-type").unwrap_or_default().starts_with("application/json"), "{case}: not JSON: {r}");
    let j = r.json();
    assert_eq!(j["code"].as_u64(), Some(u64::from(r.status)), "{case}: `code` must be the status: {r}");
    assert!(j["message"].as_str().is_some_and(|m| !m.is_empty()), "{case}: no message: {r}");
    eprintln!(
        "{case:<58} -> {}: {}",
        r.status,
        j["message"].as_str().unwrap_or_default().chars().take(110).collect::<String>()
    );
}

/// Every case runs, and the test fails at the end with the list of those that failed (each
/// failure's message is printed as it happens): one run shows the server's author all of them.
#[derive(Default)]
struct Cases(Vec<String>);

impl Cases {
    fn check(&mut self, name: &str, case: impl FnOnce()) {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(case)).is_err() {
            self.0.push(name.to_string());
        }
    }
}

/// Standard base64 (with or without padding), for the stdout of process events.
fn base64_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut bits, mut n) = (0u32, 0);
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = ALPHABET.iter().position(|&a| a == c).unwrap_or_else(|| panic!("not base64: {s}")) as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    out
}

#[test]
fn bytes_no_sdk_sends_get_clean_errors_and_the_daemon_lives_on() {
    let _alone = ONE_TEST.lock().unwrap_or_else(|e| e.into_inner());
    let front = front();
    front.clear();
    // Two sandboxes, through both create endpoints (SDKs up to 2.50 and from 2.51), at once.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| create(front, "/sandboxes"));
        let b = s.spawn(|| create(front, "/v2/sandboxes"));
        let join =
            |h: std::thread::ScopedJoinHandle<'_, Made>| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        (join(a), join(b))
    });
    let _remove = RemoveAfter(front, vec![a.id.clone(), b.id.clone()]);
    assert_ne!(a.token, b.token, "each sandbox has its own access token");

    let mut cases = Cases::default();
    cases.check("well-formed requests", || well_formed_requests_work(front, &a));
    broken_connect_requests(&mut cases, front, &a);
    wrong_headers_and_tokens(&mut cases, front, &a, &b);
    control_plane_garbage(&mut cases, front, &a);

    // The daemon is the same one and serves all of its doors.
    assert_eq!(common::daemon_pid(&front.home), Some(front.pid as i32), "the daemon died:\n{}", front.log_tail());
    assert!(front.sandboxes().len() >= 2, "moat ps lists the sandboxes");
    cases.check("well-formed requests, after all that", || well_formed_requests_work(front, &a));
    for made in [&a, &b] {
        let key = [("X-API-KEY", front.key.as_str())];
        let gone = request(front.addr, "DELETE", &format!("/sandboxes/{}", made.id), &key, b"");
        assert_eq!(gone.status, 204, "kill {}: {gone}", made.id);
        let r = request(front.addr, "GET", &format!("/sandboxes/{}", made.id), &key, b"");
        cases.check("a killed sandbox's info", || plain_error("a killed sandbox's info", &r, &[404]));
    }
    front.assert_healthy_and_empty();
    assert!(
        cases.0.is_empty(),
        "these requests got no clean error (see each one's message above):\n  {}",
        cases.0.join("\n  ")
    );
}

/// The requests an SDK sends, by hand: the wire format is as documented.
fn well_formed_requests_work(front: &Front, a: &Made) {
    let r = envd(front, &a.id, Some(&a.token), "/process.Process/List", &[JSON], b"{}");
    assert_eq!(r.status, 200, "List: {r}");
    assert!(r.header("content-type").unwrap_or_default().starts_with("application/json"), "List: {r}");
    assert!(r.json().is_object(), "List: {r}");
    let start = br#"{"process":{"cmd":"/bin/bash","args":["-l","-c","echo hi"]},"stdin":false}"#;
    for framing in ["content-length", "chunked"] {
        let (headers, body) = match framing {
            "chunked" => (vec![STREAM, ("Transfer-Encoding", "chunked")], chunked(&envelope(0, start))),
            _ => (vec![STREAM], envelope(0, start)),
        };
        let r = envd(front, &a.id, Some(&a.token), "/process.Process/Start", &headers, &body);
        assert_eq!(r.status, 200, "Start ({framing}): {r}");
        assert!(r.header("content-type").unwrap_or_default().starts_with("application/connect+json"), "{r}");
        let frames = r.envelopes();
        assert!(frames[0].1["event"]["start"]["pid"].as_u64().is_some(), "Start begins with the pid: {frames:?}");
        let stdout: Vec<u8> =
            frames.iter().filter_map(|(_, m)| m["event"]["data"]["stdout"].as_str()).flat_map(base64_decode).collect();
        assert_eq!(stdout, b"hi\n", "{frames:?}");
        let end =
            frames.iter().find_map(|(_, m)| m["event"].get("end")).unwrap_or_else(|| panic!("no end: {frames:?}"));
        assert!(end["exitCode"].as_i64().unwrap_or(0) == 0 && end.get("error").is_none(), "{end}");
        let (flags, last) = frames.last().expect("frames");
        assert!(flags & 2 != 0 && last.get("error").is_none(), "ends with a clean end-stream envelope: {frames:?}");
    }
}

fn broken_connect_requests(cases: &mut Cases, front: &Front, a: &Made) {
    let token = Some(a.token.as_str());
    let mut stream = |case: &str, headers: &[(&str, &str)], body: &[u8]| {
        cases.check(case, || {
            connect_error(case, &envd(front, &a.id, token, "/process.Process/Start", headers, body));
        })
    };
    let mut past_the_body = vec![0, 0, 0, 0, 100];
    past_the_body.extend_from_slice(b"{}");
    stream("an envelope whose length runs past the body", &[STREAM], &past_the_body);
    stream("the same, chunked", &[STREAM, ("Transfer-Encoding", "chunked")], &chunked(&past_the_body));
    let mut four_gib = vec![0, 0xff, 0xff, 0xff, 0xff];
    four_gib.extend_from_slice(b"{}");
    stream("a frame header of 4 GiB", &[STREAM], &four_gib);
    stream("a frame header of 4 GiB, chunked", &[STREAM, ("Transfer-Encoding", "chunked")], &chunked(&four_gib));
    stream("a truncated frame header", &[STREAM], &[0, 0, 0]);
    stream("an empty streaming request", &[STREAM], b"");
    stream("a compressed frame, no compression negotiated", &[STREAM], &envelope(1, b"{}"));
    stream("a frame that is not JSON", &[STREAM], &envelope(0, b"{\"process\":"));
    stream("a streaming RPC sent as unary JSON", &[JSON], b"{}");

    let mut unary = |case: &str, path: &str, headers: &[(&str, &str)], body: &[u8], codes: &[&str]| {
        cases.check(case, || {
            let (code, _) = connect_error(case, &envd(front, &a.id, token, path, headers, body));
            assert!(
                codes.is_empty() || codes.contains(&code.as_str()),
                "{case}: code {code}, expected one of {codes:?}"
            );
        })
    };
    let not_there = &["not_found", "unimplemented", "404", "501"];
    unary("an unknown method", "/process.Process/Nope", &[JSON], b"{}", not_there);
    unary("an unknown service", "/nope.Nope/Call", &[JSON], b"{}", not_there);
    let list = "/process.Process/List";
    unary("a unary RPC with content type text/plain", list, &[("Content-Type", "text/plain")], b"{}", &[]);
    unary("a unary RPC with no content type", list, &[], b"{}", &[]);
    let stat = "/filesystem.Filesystem/Stat";
    let invalid = &["invalid_argument", "400"];
    unary("unary JSON that does not parse", stat, &[JSON], b"{\"path\":", invalid);
    unary("unary JSON of the wrong shape", stat, &[JSON], br#"{"path":5}"#, invalid);
    unary("a unary message that is an array", "/process.Process/SendSignal", &[JSON], b"[1,2]", invalid);
    let kill = br#"{"process":{"pid":999999},"signal":"SIGNAL_SIGKILL"}"#;
    unary("a signal to a pid that never was", "/process.Process/SendSignal", &[JSON], kill, &["not_found", "404"]);

    // A body far larger than any message, declared and then streamed: refused before it ends.
    cases.check("a 1 GiB unary body", || {
        let head = format!(
            "POST /filesystem.Filesystem/Stat HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nConnect-Protocol-Version: 1\r\nE2b-Sandbox-Id: {}\r\n\
             E2b-Sandbox-Port: 49983\r\nX-Access-Token: {}\r\nContent-Length: 1073741824\r\n\r\n{{\"path\":\"",
            front.addr, a.id, a.token
        );
        connect_error("a 1 GiB unary body", &request_streaming_body(front.addr, &head, b'a', 64 << 20));
    });
}

fn wrong_headers_and_tokens(cases: &mut Cases, front: &Front, a: &Made, b: &Made) {
    let list = "/process.Process/List";
    let unauthenticated = |case: &str, r: &Reply| {
        let (code, _) = connect_error(case, r);
        assert_eq!(r.status, 401, "{case}: {r}");
        assert!(["unauthenticated", "401"].contains(&code.as_str()), "{case}: {code}");
    };
    cases.check("no X-Access-Token", || {
        unauthenticated("no X-Access-Token", &envd(front, &a.id, None, list, &[JSON], b"{}"))
    });
    cases.check("the access token of another sandbox", || {
        let r = envd(front, &a.id, Some(&b.token), list, &[JSON], b"{}");
        unauthenticated("the access token of another sandbox", &r)
    });
    cases.check("an empty access token", || {
        unauthenticated("an empty access token", &envd(front, &a.id, Some(""), list, &[JSON], b"{}"))
    });
    let a_envd =
        [("E2b-Sandbox-Id", a.id.as_str()), ("E2b-Sandbox-Port", "49983"), ("X-Access-Token", a.token.as_str())];
    cases.check("Start with another sandbox's token", || {
        let start = envelope(0, br#"{"process":{"cmd":"/bin/bash","args":["-l","-c","echo pwned > /tmp/pwned"]}}"#);
        let r = envd(front, &a.id, Some(&b.token), "/process.Process/Start", &[STREAM], &start);
        unauthenticated("Start with another sandbox's token", &r);
        let r = request(front.addr, "GET", "/files?path=/tmp/pwned", &a_envd, b"");
        plain_error("... and the command it carried never ran", &r, &[404]);
    });
    cases.check("GET /files with another sandbox's token", || {
        let files = |token: &str| {
            let headers = [("E2b-Sandbox-Id", a.id.as_str()), ("E2b-Sandbox-Port", "49983"), ("X-Access-Token", token)];
            request(front.addr, "GET", "/files?path=/etc/passwd", &headers, b"")
        };
        assert_eq!(files(&a.token).status, 200, "reading a file with the right token");
        plain_error("GET /files with another sandbox's token", &files(&b.token), &[401]);
    });
    cases.check("a guest port with another sandbox's token", || {
        // Routed by Host (what get_host gives), to another port of the sandbox.
        let host = format!("8080-{}.localhost:{}", a.id, front.addr.port());
        let r = request(front.addr, "GET", "/", &[("Host", &host), ("X-Access-Token", &b.token)], b"");
        plain_error("a guest port with another sandbox's token", &r, &[401]);
    });
    // Nothing says which sandbox, or a sandbox that is not there.
    cases.check("an unknown access token and no sandbox header", || {
        let r = request(front.addr, "POST", list, &[JSON, ("X-Access-Token", "0123456789abcdef")], b"{}");
        connect_error("an unknown access token and no sandbox header", &r);
    });
    cases.check("no sandbox header and no token", || {
        connect_error("no sandbox header and no token", &request(front.addr, "POST", list, &[JSON], b"{}"));
    });
    cases.check("a sandbox that does not exist", || {
        let r = envd(front, "inosuchbox", Some(&a.token), list, &[JSON], b"{}");
        let (_, message) = connect_error("a sandbox that does not exist", &r);
        assert!(message.contains("was not found"), "the SDK reads `was not found` as a dead sandbox: {message}");
    });
    cases.check("E2b-Sandbox-Port that is not a port", || {
        let headers =
            [("E2b-Sandbox-Id", a.id.as_str()), ("E2b-Sandbox-Port", "http"), ("X-Access-Token", &a.token), JSON];
        connect_error("E2b-Sandbox-Port that is not a port", &request(front.addr, "POST", list, &headers, b"{}"));
    });
    cases.check("a 64 KiB sandbox id", || {
        let long = "x".repeat(64 << 10);
        let r =
            request(front.addr, "POST", list, &[("E2b-Sandbox-Id", &long), ("X-Access-Token", &a.token), JSON], b"{}");
        assert!((400..600).contains(&r.status), "a 64 KiB sandbox id: {r}");
        eprintln!("{:<58} -> {}", "a 64 KiB sandbox id", r.status);
    });
    // /files, malformed.
    let mut files = |case: &str, method: &str, path: &str, content_type: &str, body: &[u8], statuses: &[u16]| {
        cases.check(case, || {
            let mut headers = a_envd.to_vec();
            headers.push(("Content-Type", content_type));
            plain_error(case, &request(front.addr, method, path, &headers, body), statuses);
        })
    };
    files("GET /files without a path", "GET", "/files", "text/plain", b"", &[400]);
    let broken = b"--XYZ\r\nbroken";
    files(
        "POST /files, a broken multipart body",
        "POST",
        "/files?path=/tmp/x",
        "multipart/form-data; boundary=XYZ",
        broken,
        &[400],
    );
    files(
        "POST /files, multipart without a boundary",
        "POST",
        "/files?path=/tmp/x",
        "multipart/form-data",
        b"--\r\n",
        &[400],
    );
    let nobody = "/files?path=/etc/passwd&username=nobody-here";
    files("GET /files as a user the guest does not have", "GET", nobody, "text/plain", b"", &[400, 401]);
    files("GET /files of a directory", "GET", "/files?path=/etc", "text/plain", b"", &[400]);
}

fn control_plane_garbage(cases: &mut Cases, front: &Front, a: &Made) {
    let key = front.key.as_str();
    let wrong = format!("e2b_{}", "0".repeat(32));
    let mut send = |case: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8], statuses: &[u16]| {
        cases.check(case, || plain_error(case, &request(front.addr, method, path, headers, body), statuses))
    };
    send("a wrong API key", "GET", "/v2/sandboxes", &[("X-API-KEY", &wrong)], b"", &[401]);
    send("an empty API key", "GET", "/v2/sandboxes", &[("X-API-KEY", "")], b"", &[401]);
    send("kill with a wrong API key", "DELETE", &format!("/sandboxes/{}", a.id), &[("X-API-KEY", &wrong)], b"", &[401]);
    let with_key = [("X-API-KEY", key), JSON];
    send("create with JSON that does not parse", "POST", "/v2/sandboxes", &with_key, b"{\"templateID\":", &[400]);
    send("create without a templateID", "POST", "/v2/sandboxes", &with_key, b"{}", &[400]);
    let soon = br#"{"templateID":"e2b-test","timeout":"soon"}"#;
    send("create with a timeout that is not a number", "POST", "/v2/sandboxes", &with_key, soon, &[400]);
    let missing = br#"{"templateID":"no-such-template-here"}"#;
    send("create from a template that does not exist", "POST", "/v2/sandboxes", &with_key, missing, &[400, 404]);
    let text_plain = [("X-API-KEY", key), ("Content-Type", "text/plain")];
    send("create with content type text/plain", "POST", "/v2/sandboxes", &text_plain, b"{}", &[400, 415]);
    let timeout = br#"{"timeout":60}"#;
    send(
        "set_timeout of a sandbox that does not exist",
        "POST",
        "/sandboxes/nosuchbox/timeout",
        &with_key,
        timeout,
        &[404],
    );
    send("an unknown control-plane route", "GET", "/no/such/route", &[("X-API-KEY", key)], b"", &[404, 405]);
    send(
        "list with a limit that is not a number",
        "GET",
        "/v2/sandboxes?limit=abc",
        &[("X-API-KEY", key)],
        b"",
        &[400],
    );
    cases.check("the sandbox is still there", || {
        let r = request(front.addr, "GET", &format!("/sandboxes/{}", a.id), &[("X-API-KEY", key)], b"");
        assert_eq!(r.status, 200, "the sandbox is still there: {r}");
    });
    cases.check("list with a garbage next token", || {
        let r = request(front.addr, "GET", "/v2/sandboxes?nextToken=%ff%fe", &[("X-API-KEY", key)], b"");
        assert!(r.status == 200 || (400..500).contains(&r.status), "list with a garbage next token: {r}");
    });
    // A huge JSON body: refused before all of it arrives.
    cases.check("create with a 1 GiB JSON body", || {
        let head = format!(
            "POST /v2/sandboxes HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nX-API-KEY: {key}\r\n\
             Content-Type: application/json\r\nContent-Length: 1073741824\r\n\r\n\
             {{\"templateID\":\"e2b-test\",\"metadata\":{{\"k\":\"",
            front.addr
        );
        let r = request_streaming_body(front.addr, &head, b'm', 64 << 20);
        plain_error("create with a 1 GiB JSON body", &r, &[400, 413]);
    });
}
