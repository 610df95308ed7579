//! What a client attaches to a sandbox and to the files it writes, through the real daemon and
//! agent: labels to find sandboxes by (`run --label`, `ps --label`, `GET /v1/sandboxes?label=`),
//! a default environment every command starts with (`run -d -e`), kept by forks, files and
//! directories made for a guest user (`owner`), and a lease that ends in a pause.

use crate::common;

use std::time::Duration;

use common::{moat_in, moat_ok, text, wait_for, OwnHome};
use moat_api::{ErrorCode, MakeDir};
use moat_client::Client;

/// The names `moat ps` lists for these arguments, sorted.
fn ps_names(h: &std::path::Path, args: &[&str]) -> Vec<String> {
    let out = moat_ok(h, &[&["ps", "-a", "--json"], args].concat());
    let list: Vec<moat_api::SandboxInfo> = serde_json::from_str(&out).expect("ps --json is a list of sandboxes");
    let mut names: Vec<String> = list.into_iter().map(|s| s.name).collect();
    names.sort();
    names
}

#[test]
fn labels_find_sandboxes_and_the_default_environment_reaches_every_command() {
    let home = OwnHome::new();
    let h = home.path();
    let run =
        |name: &str, extra: &[&str]| moat_ok(h, &[&["run", "-d", "--name", name, "--memory", "256"], extra].concat());
    run("lab", &["--label", "team=ml", "--label", "tier=gpu=big", "-e", "GREETING=hello", "-e", "SHARED=sandbox"]);
    run("web", &["--label", "team=web"]);

    assert_eq!(ps_names(h, &["--label", "team=ml"]), ["lab"]);
    assert_eq!(ps_names(h, &["--label", "team"]), ["lab", "web"]);
    assert_eq!(ps_names(h, &["--label", "team", "--label", "tier=gpu=big"]), ["lab"]);
    assert!(ps_names(h, &["--label", "team=ops"]).is_empty());
    assert_eq!(ps_names(h, &[]), ["lab", "web"]);
    let inspect = moat_ok(h, &["inspect", "lab"]);
    assert!(inspect.contains("labels:\n  team=ml\n  tier=gpu=big\n"), "{inspect}");
    assert!(inspect.contains("environment:\n  GREETING=hello\n  SHARED=sandbox\n"), "{inspect}");

    // Every exec starts with the sandbox's environment; its own values win.
    let echo = ["--", "sh", "-c", "echo $GREETING $SHARED"];
    assert_eq!(moat_ok(h, &[&["exec", "lab"][..], &echo].concat()), "hello sandbox\n");
    assert_eq!(moat_ok(h, &[&["exec", "-e", "SHARED=exec", "lab"][..], &echo].concat()), "hello exec\n");
    assert_eq!(moat_ok(h, &[&["exec", "web"][..], &echo].concat()), "\n", "the other sandbox has none");
    // So does a background process.
    moat_ok(h, &["exec", "-d", "lab", "--", "sh", "-c", "echo $GREETING > /tmp/bg.out"]);
    wait_for("the background process's output", Duration::from_secs(30), || {
        moat_in(h)
            .args(["exec", "lab", "--", "cat", "/tmp/bg.out"])
            .output()
            .is_ok_and(|o| text(&o.stdout) == "hello\n")
    });

    // A fork keeps both; the labels find it with its parent.
    moat_ok(h, &["fork", "lab", "--name-prefix", "lab-copy-"]);
    assert_eq!(ps_names(h, &["--label", "team=ml"]), ["lab", "lab-copy-1"]);
    assert_eq!(moat_ok(h, &[&["exec", "lab-copy-1"][..], &echo].concat()), "hello sandbox\n");

    // Refused before anything is made, with what to do.
    let out = moat_in(h).args(["run", "-d", "--label", "no-value"]).output().unwrap();
    assert!(!out.status.success() && text(&out.stderr).contains("is not KEY=VALUE"), "{}", text(&out.stderr));
    let out = moat_in(h).args(["ps", "--label", "=x"]).output().unwrap();
    assert!(!out.status.success() && text(&out.stderr).contains("label key"), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread")]
async fn files_and_directories_are_made_for_their_owner() {
    let home = OwnHome::new();
    let h = home.path().to_path_buf();
    let hh = h.clone();
    tokio::task::spawn_blocking(move || moat_ok(&hh, &["run", "-d", "--name", "own", "--memory", "256"]))
        .await
        .unwrap();
    let c = Client::new(&moat_daemon::socket_path(&h));
    // The minimal image's /etc/passwd has `nobody`, 65534:65534.
    let nobody = (65534, 65534);
    let owner_of = |info: moat_api::FileInfo| (info.uid, info.gid);

    let written = c.write_file_as("own", "/tmp/mine.txt", Some(0o600), true, Some("nobody"), &b"hi"[..]).await.unwrap();
    assert_eq!((written.uid, written.gid, written.mode), (nobody.0, nobody.1, 0o600));
    let written = c.write_file_as("own", "/tmp/direct.txt", None, false, Some("nobody"), &b"hi"[..]).await.unwrap();
    assert_eq!(owner_of(written), nobody);
    // An atomic rewrite without an owner keeps the file's.
    let rewritten = c.write_file("own", "/tmp/mine.txt", None, true, &b"again"[..]).await.unwrap();
    assert_eq!(owner_of(rewritten), nobody);
    assert_eq!(owner_of(c.write_file("own", "/tmp/root.txt", None, true, &b"x"[..]).await.unwrap()), (0, 0));

    let mkdir = MakeDir { path: "/tmp/a/b/c".into(), parents: true, mode: None, owner: Some("nobody".into()) };
    c.mkdir("own", &mkdir).await.unwrap();
    for made in ["/tmp/a", "/tmp/a/b", "/tmp/a/b/c"] {
        assert_eq!(owner_of(c.stat("own", made).await.unwrap()), nobody, "{made}");
    }
    assert_eq!(owner_of(c.stat("own", "/tmp").await.unwrap()), (0, 0), "what was there stays as it was");

    // An unknown user is refused, named, and nothing is written.
    let e = c.write_file_as("own", "/tmp/x.txt", None, true, Some("carol"), &b"x"[..]).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidRequest), "{e}");
    assert!(e.to_string().contains("\"carol\"") && e.to_string().contains("/etc/passwd"), "{e}");
    assert_eq!(c.stat("own", "/tmp/x.txt").await.unwrap_err().code(), Some(ErrorCode::NotFound));
    let e = c.mkdir("own", &MakeDir { owner: Some("carol".into()), ..mkdir }).await.unwrap_err();
    assert!(e.to_string().contains("\"carol\""), "{e}");

    // The client's label listing, over the same socket.
    assert!(c.list_labeled(&[("team".into(), "ml".into())]).await.unwrap().is_empty());
    assert_eq!(c.list_labeled(&[]).await.unwrap().len(), 1);
    let (status, body) = c.raw("GET", "/v1/sandboxes?lable=team", Vec::new()).await.unwrap();
    assert!(status == 400 && body.contains("unknown query parameter") && body.contains("lable"), "{status} {body}");
}

/// `--on-expire pause`: when the lease runs out the sandbox is paused, not stopped, and no
/// longer has a lease; resumed, it carries on where it was.
#[test]
fn a_lease_that_runs_out_pauses_a_sandbox_that_asked() {
    let home = OwnHome::new();
    let h = home.path();
    moat_ok(h, &["run", "-d", "--name", "nap", "--memory", "256", "--ttl", "10m", "--on-expire", "pause"]);
    moat_ok(h, &["exec", "nap", "--", "sh", "-c", "echo before > /dev/shm/state"]);
    moat_ok(h, &["lease", "renew", "nap", "--ttl", "1s"]);
    let inspect = || -> moat_api::SandboxInfo {
        let out = moat_ok(h, &["inspect", "--json", "nap"]);
        serde_json::from_str(&out).expect("inspect --json is a sandbox")
    };
    wait_for("the lease to pause the sandbox", Duration::from_secs(60), || inspect().phase == moat_api::Phase::Paused);
    let paused = inspect();
    assert_eq!((paused.expires_at, paused.pid), (None, None), "{paused:?}");
    moat_ok(h, &["resume", "nap"]);
    assert_eq!(moat_ok(h, &["exec", "nap", "--", "cat", "/dev/shm/state"]), "before\n", "memory survived");
    let resumed = inspect();
    assert_eq!((resumed.phase, resumed.expires_at), (moat_api::Phase::Running, None), "no lease pauses it again");
}
