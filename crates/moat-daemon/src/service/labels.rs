//! What a client attaches to a sandbox when it creates it: labels to find it by, and the
//! environment every command in it starts with.

use moat_api::{CreateSandbox, ErrorCode, LabelSelector, SandboxInfo};

use super::Service;
use crate::error::ServiceError;

/// The labels and default environment of a create request, checked before anything is made.
pub(super) fn check_create(req: &CreateSandbox) -> Result<(), ServiceError> {
    moat_api::validate_labels(&req.labels).map_err(|e| {
        ServiceError::new(
            ErrorCode::InvalidRequest,
            e,
            format!(
                "give at most {} labels, keys of 1-{} bytes without '=' or control characters and values of at \
                 most {} bytes without control characters",
                moat_api::MAX_LABELS,
                moat_api::MAX_LABEL_KEY,
                moat_api::MAX_LABEL_VALUE
            ),
        )
    })?;
    moat_api::validate_env(&req.env).map_err(|e| {
        ServiceError::new(
            ErrorCode::InvalidRequest,
            e,
            format!(
                "give at most {} variables as [NAME, VALUE] with names that are not empty and have no '=', and no \
                 NUL bytes",
                moat_api::MAX_SANDBOX_ENV
            ),
        )
    })
}

/// Label selectors from a query string's `label` parameters (`KEY=VALUE` or `KEY`).
pub fn parse_selectors<'a>(raw: impl IntoIterator<Item = &'a str>) -> Result<Vec<LabelSelector>, ServiceError> {
    raw.into_iter()
        .map(|s| {
            s.parse::<LabelSelector>().map_err(|e| {
                ServiceError::new(
                    ErrorCode::InvalidRequest,
                    format!("label selector {:?}: {e}", s.chars().take(64).collect::<String>()),
                    "select with label=KEY=VALUE, or label=KEY for any value",
                )
            })
        })
        .collect()
}

/// A process's environment: the sandbox's network's (secret placeholders, where moat's CA is),
/// then the sandbox's default environment, then the caller's; a later value wins.
pub(super) fn process_env(info: &SandboxInfo, env: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut all = crate::net::guest_env(&info.net);
    all.extend(info.env.iter().filter(|(k, _)| !env.iter().any(|(n, _)| n == k)).cloned());
    all.extend(env);
    all
}

impl Service {
    /// The sandboxes that match every selector, oldest first.
    pub fn list_labeled(&self, selectors: &[LabelSelector]) -> Result<Vec<SandboxInfo>, ServiceError> {
        let mut all = self.list()?;
        all.retain(|s| selectors.iter().all(|sel| sel.matches(&s.labels)));
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_labels_and_environments_are_refused_with_the_remedy() {
        let req = |labels: &[(&str, &str)], env: &[(&str, &str)]| CreateSandbox {
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..CreateSandbox::default()
        };
        assert!(check_create(&req(&[("team", "ml")], &[("A", "1")])).is_ok());
        let e = check_create(&req(&[("a=b", "v")], &[])).expect_err("a key with '='");
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        assert!(e.hint.contains("without '='"), "{e:?}");
        let e = check_create(&req(&[], &[("A=B", "1")])).expect_err("a name with '='");
        assert!(e.message.contains("\"A=B\"") && e.hint.contains("[NAME, VALUE]"), "{e:?}");
        let e = parse_selectors(["team=ml", "=x"]).expect_err("an empty key");
        assert!(e.message.contains("\"=x\"") && e.hint.contains("label=KEY"), "{e:?}");
        assert_eq!(parse_selectors(["team=ml", "gpu"]).expect("selectors").len(), 2);
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// Labels and the environment are recorded, select listings, and go with a fork; a sandbox
    /// made from a snapshot has only the labels it asked for.
    #[tokio::test]
    async fn labels_select_sandboxes_and_forks_inherit_them() {
        use crate::launcher::fake::TestService;
        let t = TestService::new(crate::service::tests::limits());
        let labeled = |name: &str, labels: &[(&str, &str)]| CreateSandbox {
            labels: pairs(labels).into_iter().collect(),
            env: pairs(&[("GREETING", name)]),
            ..TestService::request(name)
        };
        let a = t.svc.create(labeled("one", &[("team", "ml"), ("gpu", "")])).await.unwrap();
        assert_eq!(a.labels.get("team").map(String::as_str), Some("ml"));
        assert_eq!(t.svc.inspect("one").unwrap().env, pairs(&[("GREETING", "one")]));
        t.svc.create(labeled("two", &[("team", "web")])).await.unwrap();
        let names = |sel: &[&str]| -> Vec<String> {
            let sel = parse_selectors(sel.iter().copied()).unwrap();
            // Created in the same second, they are in id order, which is random.
            let mut names: Vec<String> = t.svc.list_labeled(&sel).unwrap().into_iter().map(|s| s.name).collect();
            names.sort();
            names
        };
        assert_eq!(names(&[]), ["one", "two"]);
        assert_eq!(names(&["team=ml"]), ["one"]);
        assert_eq!(names(&["team"]), ["one", "two"]);
        assert_eq!(names(&["team", "gpu"]), ["one"]);
        assert!(names(&["team=ops"]).is_empty());

        let forked = t.svc.fork("one", moat_api::Fork::default()).await.unwrap();
        let fork = &forked.sandboxes[0];
        assert_eq!((&fork.labels, &fork.env), (&a.labels, &a.env));
        assert_eq!(names(&["team=ml"]), ["one", fork.name.as_str()], "one-fork-1 sorts after one");

        let restored = CreateSandbox {
            from: Some(forked.snapshot.id.clone()),
            labels: pairs(&[("restored", "yes")]).into_iter().collect(),
            ..TestService::request("three")
        };
        let c = t.svc.create(CreateSandbox { image: None, ..restored }).await.unwrap();
        assert_eq!(c.labels, pairs(&[("restored", "yes")]).into_iter().collect());
        assert!(c.env.is_empty());
    }

    #[test]
    fn the_callers_environment_wins_over_the_sandboxs() {
        let mut info = crate::state::tests::sample("abc000000001", "a");
        info.net.mode = moat_api::NetMode::None;
        info.env = vec![("A".into(), "sandbox".into()), ("B".into(), "sandbox".into())];
        let env = process_env(&info, vec![("B".into(), "exec".into()), ("C".into(), "exec".into())]);
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(pairs, [("A", "sandbox"), ("B", "exec"), ("C", "exec")]);
    }
}
