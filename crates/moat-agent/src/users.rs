//! Users and groups from the guest's /etc/passwd and /etc/group. Parsed here because a static
//! glibc binary cannot use NSS.

use std::path::Path;

/// Who a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (including the primary group for users found in /etc/passwd).
    pub groups: Vec<u32>,
    pub home: String,
    /// The login name, when /etc/passwd knows the uid.
    pub name: Option<String>,
}

impl Identity {
    /// The identity of processes started without a `user`.
    pub fn root() -> Identity {
        Identity { uid: 0, gid: 0, groups: vec![], home: "/root".into(), name: Some("root".into()) }
    }

    /// True when switching to this identity changes nothing for a process started by root.
    pub fn is_plain_root(&self) -> bool {
        self.uid == 0 && self.gid == 0 && self.groups.iter().all(|&g| g == 0)
    }
}

/// Why a `user` of an exec request could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("the user {0:?} is not a user name, a uid or uid:gid")]
    Invalid(String),
    #[error("the user {0:?} does not exist in the sandbox's /etc/passwd")]
    NoSuchUser(String),
    #[error("the group {0:?} does not exist in the sandbox's /etc/group")]
    NoSuchGroup(String),
}

struct Passwd {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

fn read_db(etc: &Path, file: &str) -> String {
    // A missing file is an empty database: numeric ids still work.
    std::fs::read_to_string(etc.join(file)).unwrap_or_default()
}

fn passwd(etc: &Path) -> Vec<Passwd> {
    read_db(etc, "passwd")
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some(Passwd {
                name: f.first()?.to_string(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
                home: f.get(5)?.to_string(),
            })
        })
        .collect()
}

struct Group {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn groups(etc: &Path) -> Vec<Group> {
    read_db(etc, "group")
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let members = f
                .get(3)
                .map(|m| m.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect())
                .unwrap_or_default();
            Some(Group { name: f.first()?.to_string(), gid: f.get(2)?.parse().ok()?, members })
        })
        .collect()
}

/// Resolve `name`, `uid`, `name:group` or `uid:gid` against the files in `etc`.
pub fn resolve(spec: &str, etc: &Path) -> Result<Identity, UserError> {
    if spec.is_empty() || spec.len() > 256 || spec.contains('\0') {
        return Err(UserError::Invalid(spec.chars().take(64).collect()));
    }
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() || group == Some("") {
        return Err(UserError::Invalid(spec.into()));
    }
    let users = passwd(etc);
    let (uid, entry) = match user.parse::<u32>() {
        Ok(uid) => (uid, users.iter().find(|p| p.uid == uid)),
        Err(_) => {
            let p = users.iter().find(|p| p.name == user).ok_or_else(|| UserError::NoSuchUser(user.into()))?;
            (p.uid, Some(p))
        }
    };
    let all_groups = groups(etc);
    let gid = match group {
        None => entry.map(|p| p.gid).unwrap_or(uid),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => all_groups
                .iter()
                .find(|gr| gr.name == g)
                .map(|gr| gr.gid)
                .ok_or_else(|| UserError::NoSuchGroup(g.into()))?,
        },
    };
    let mut supplementary = vec![gid];
    if let Some(p) = entry {
        supplementary.extend(all_groups.iter().filter(|g| g.members.contains(&p.name)).map(|g| g.gid));
    }
    supplementary.sort_unstable();
    supplementary.dedup();
    let home = match entry {
        Some(p) if !p.home.is_empty() => p.home.clone(),
        _ if uid == 0 => "/root".into(),
        _ => "/".into(),
    };
    Ok(Identity { uid, gid, groups: supplementary, home, name: entry.map(|p| p.name.clone()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etc(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("moat-agent-users-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("passwd"),
            "root:x:0:0:root:/root:/bin/sh\nbob:x:1000:1000::/home/bob:/bin/sh\nbroken line\nnohome:x:1001:1001:::/bin/sh\n",
        )
        .unwrap();
        std::fs::write(dir.join("group"), "root:x:0:\nbob:x:1000:\nwheel:x:10:bob,alice\n").unwrap();
        dir
    }

    #[test]
    fn names_uids_and_groups_resolve() {
        let dir = etc("resolve");
        let bob = Identity {
            uid: 1000,
            gid: 1000,
            groups: vec![10, 1000],
            home: "/home/bob".into(),
            name: Some("bob".into()),
        };
        assert_eq!(resolve("bob", &dir).unwrap(), bob);
        assert_eq!(resolve("1000", &dir).unwrap(), bob);
        assert_eq!(resolve("0", &dir).unwrap().home, "/root");
        assert!(resolve("root", &dir).unwrap().is_plain_root());
        assert_eq!(
            resolve("4242", &dir).unwrap(),
            Identity { uid: 4242, gid: 4242, groups: vec![4242], home: "/".into(), name: None }
        );
        assert_eq!(resolve("nohome", &dir).unwrap().home, "/");
        assert_eq!(resolve("bob:wheel", &dir).unwrap().gid, 10);
        assert_eq!(resolve("5:7", &dir).unwrap().gid, 7);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unknown_users_and_groups_are_named_in_the_error() {
        let dir = etc("unknown");
        assert!(matches!(resolve("carol", &dir), Err(UserError::NoSuchUser(u)) if u == "carol"));
        assert!(resolve("carol", &dir).unwrap_err().to_string().contains("/etc/passwd"));
        assert!(matches!(resolve("bob:nogroup", &dir), Err(UserError::NoSuchGroup(g)) if g == "nogroup"));
        assert!(matches!(resolve("", &dir), Err(UserError::Invalid(_))));
        assert!(matches!(resolve("bob:", &dir), Err(UserError::Invalid(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
