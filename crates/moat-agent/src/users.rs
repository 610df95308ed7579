//! Users and groups from the guest's /etc/passwd and /etc/group. Parsed here because static glibc
//! cannot use NSS.

use std::path::Path;

/// Who a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
}

impl Identity {
    pub fn root() -> Identity {
        Identity { uid: 0, gid: 0, groups: vec![], home: "/root".into() }
    }
}

struct Passwd {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

fn passwd(etc: &Path) -> Vec<Passwd> {
    std::fs::read_to_string(etc.join("passwd"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some(Passwd { name: f.first()?.to_string(), uid: f.get(2)?.parse().ok()?, gid: f.get(3)?.parse().ok()?, home: f.get(5)?.to_string() })
        })
        .collect()
}

/// (name, gid, members) of every group.
fn groups(etc: &Path) -> Vec<(String, u32, Vec<String>)> {
    std::fs::read_to_string(etc.join("group"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let members = f.get(3).map(|m| m.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect()).unwrap_or_default();
            Some((f.first()?.to_string(), f.get(2)?.parse().ok()?, members))
        })
        .collect()
}

/// Resolve `name`, `uid`, `name:group` or `uid:gid` against the files in `etc`.
pub fn resolve(spec: &str, etc: &Path) -> Result<Identity, String> {
    if spec.is_empty() || spec.len() > 256 || spec.contains('\0') {
        return Err("the user name is empty, too long or contains NUL".into());
    }
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let users = passwd(etc);
    let entry = match user.parse::<u32>() {
        Ok(uid) => users.iter().find(|p| p.uid == uid),
        Err(_) => Some(users.iter().find(|p| p.name == user).ok_or_else(|| format!("user {user:?} does not exist in the sandbox's /etc/passwd"))?),
    };
    let uid = entry.map(|p| p.uid).unwrap_or_else(|| user.parse().expect("numeric: checked above"));
    let all_groups = groups(etc);
    let gid = match group {
        None => entry.map(|p| p.gid).unwrap_or(uid),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => all_groups.iter().find(|(n, _, _)| n == g).map(|(_, gid, _)| *gid).ok_or_else(|| format!("group {g:?} does not exist in the sandbox's /etc/group"))?,
        },
    };
    let groups = match entry {
        Some(p) => all_groups.iter().filter(|(_, _, m)| m.contains(&p.name)).map(|(_, g, _)| *g).collect(),
        None => vec![],
    };
    let home = entry.map(|p| p.home.clone()).unwrap_or_else(|| "/".into());
    Ok(Identity { uid, gid, groups, home })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_uids_and_groups_resolve() {
        let dir = std::env::temp_dir().join(format!("moat-users-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("passwd"), "root:x:0:0:root:/root:/bin/sh\nbob:x:1000:1000::/home/bob:/bin/sh\nbroken line\n").unwrap();
        std::fs::write(dir.join("group"), "root:x:0:\nbob:x:1000:\nwheel:x:10:bob,alice\n").unwrap();
        assert_eq!(resolve("bob", &dir).unwrap(), Identity { uid: 1000, gid: 1000, groups: vec![10], home: "/home/bob".into() });
        assert_eq!(resolve("0", &dir).unwrap().home, "/root");
        assert_eq!(resolve("4242", &dir).unwrap(), Identity { uid: 4242, gid: 4242, groups: vec![], home: "/".into() });
        assert_eq!(resolve("bob:wheel", &dir).unwrap().gid, 10);
        assert_eq!(resolve("5:7", &dir).unwrap().gid, 7);
        assert!(resolve("carol", &dir).unwrap_err().contains("carol"));
        assert!(resolve("bob:nogroup", &dir).unwrap_err().contains("nogroup"));
        assert!(resolve("", &dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
