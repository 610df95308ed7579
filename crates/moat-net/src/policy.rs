//! What a sandbox may reach: the egress policy, checked on the host for every flow and DNS query.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;

use crate::NetError;

/// A hostname pattern of an allowlist: `pypi.org` (that name only) or `*.pythonhosted.org` (any
/// name below it, not the name itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    wildcard: bool,
    /// Lowercase, without a trailing dot; for a wildcard, the part after `*.`.
    name: String,
}

impl HostPattern {
    pub fn parse(s: &str) -> Result<HostPattern, NetError> {
        let lower = s.trim().trim_end_matches('.').to_ascii_lowercase();
        let (wildcard, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest.to_string()),
            None => (false, lower),
        };
        if !is_hostname(&name) || (wildcard && !name.contains('.')) {
            return Err(NetError::Invalid(format!(
                "{s:?} is not a hostname pattern: use a name such as pypi.org or *.pythonhosted.org \
                 (for addresses, use --allow-cidr)"
            )));
        }
        Ok(HostPattern { wildcard, name })
    }

    /// Whether `host`, a name as TLS SNI and Host headers carry it, matches. Only a hostname can:
    /// in anything else (`x\.allowed.com`, DNS's escaped form of a label with a dot in it) a
    /// dot need not separate labels.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host);
        is_hostname(host) && self.matches_labels(&host.split('.').map(str::as_bytes).collect::<Vec<_>>())
    }

    /// Whether the name made of `labels` matches, compared label by label (ASCII case aside).
    /// A DNS label may hold any byte, a dot included, so `x.allowed` + `com` is two labels and
    /// no name below `allowed.com`.
    pub fn matches_labels(&self, labels: &[&[u8]]) -> bool {
        let own: Vec<&str> = self.name.split('.').collect();
        let Some(extra) = labels.len().checked_sub(own.len()) else { return false };
        (if self.wildcard { extra > 0 } else { extra == 0 })
            && labels[extra..].iter().zip(&own).all(|(label, own)| label.eq_ignore_ascii_case(own.as_bytes()))
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.wildcard {
            write!(f, "*.")?;
        }
        f.write_str(&self.name)
    }
}

/// A DNS name: dot-separated labels of letters, digits, `-` and `_`, 253 bytes at most.
pub fn is_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.parse::<IpAddr>().is_err()
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !l.starts_with('-')
        })
}

/// Why an address is refused whatever the mode (unless `--allow-cidr` covers it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    Loopback,
    Private,
    LinkLocal,
    Metadata,
    Multicast,
    Reserved,
    Host,
    /// Allowlist mode: the address or name is not on the allowlist.
    Allowlist,
    /// The sandbox has too many flows open.
    Limit,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Loopback => "loopback",
            Rule::Private => "private",
            Rule::LinkLocal => "link-local",
            Rule::Metadata => "metadata",
            Rule::Multicast => "multicast",
            Rule::Reserved => "reserved",
            Rule::Host => "host",
            Rule::Allowlist => "allowlist",
            Rule::Limit => "limit",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Rule::Loopback => "loopback address",
            Rule::Private => "private address",
            Rule::LinkLocal => "link-local address",
            Rule::Metadata => "cloud metadata address",
            Rule::Multicast => "multicast or broadcast address",
            Rule::Reserved => "reserved address",
            Rule::Host => "an address of the host itself",
            Rule::Allowlist => "not on the allowlist",
            Rule::Limit => "too many open connections",
        }
    }
}

/// The rule that refuses `ip` in every mode, if one does. Host addresses are checked separately.
pub fn special(ip: Ipv4Addr) -> Option<Rule> {
    let o = ip.octets();
    if ip.is_loopback() {
        Some(Rule::Loopback)
    } else if [[169, 254, 169, 254], [100, 100, 100, 200], [168, 63, 129, 16]].contains(&o) {
        // AWS, GCP, Azure and OpenStack's metadata; Alibaba's; Azure's WireServer, a public
        // address that gives out the VM agent's configuration.
        Some(Rule::Metadata)
    } else if ip.is_private() || (o[0] == 100 && (o[1] & 0xc0) == 64) || (o[0] == 198 && (o[1] & 0xfe) == 18) {
        // RFC 1918, CGNAT (100.64.0.0/10), benchmarking (198.18.0.0/15).
        Some(Rule::Private)
    } else if ip.is_link_local() {
        Some(Rule::LinkLocal)
    } else if ip.is_multicast() || ip.is_broadcast() {
        Some(Rule::Multicast)
    } else if ip.is_unspecified() || o[0] == 0 || o[0] >= 240 || (o[0] == 192 && o[1] == 0 && o[2] == 0) {
        Some(Rule::Reserved)
    } else {
        None
    }
}

/// The addresses of the host's own interfaces (in the daemon's network namespace), refreshed at
/// most every few seconds, and those the operator names (`moat serve --host-address`).
pub struct HostAddrs {
    cache: Mutex<(Option<Instant>, HashSet<Ipv4Addr>)>,
    configured: HashSet<Ipv4Addr>,
}

impl HostAddrs {
    const TTL: Duration = Duration::from_secs(5);

    pub fn new() -> HostAddrs {
        HostAddrs::with([])
    }

    /// The interfaces' addresses and `configured` ones.
    pub fn with(configured: impl IntoIterator<Item = Ipv4Addr>) -> HostAddrs {
        HostAddrs { cache: Mutex::new((None, HashSet::new())), configured: configured.into_iter().collect() }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        if self.configured.contains(&ip) {
            return true;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.0.is_none_or(|at| at.elapsed() > Self::TTL) {
            *cache = (Some(Instant::now()), interface_addrs());
        }
        cache.1.contains(&ip)
    }
}

impl Default for HostAddrs {
    fn default() -> Self {
        HostAddrs::new()
    }
}

fn interface_addrs() -> HashSet<Ipv4Addr> {
    let mut out = HashSet::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below; entries are read-only here.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut cur = head;
        while !cur.is_null() {
            let addr = (*cur).ifa_addr;
            if !addr.is_null() && i32::from((*addr).sa_family) == libc::AF_INET {
                let sin = &*(addr as *const libc::sockaddr_in);
                out.insert(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out
}

/// The policy of one sandbox. Changing the allowlist takes effect for the next flow and query.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// `None`: every public address; `Some`: only names on the list.
    pub allow: Option<Vec<HostPattern>>,
    pub allow_cidrs: Vec<Ipv4Net>,
    /// `--add-host`: names moat's DNS answers itself.
    pub hosts: HashMap<String, Ipv4Addr>,
}

/// What the first check of a new flow (by address alone) says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Allowlist mode, and the guest resolved an allowed name to this address: allowed only for
    /// what names an allowed name that resolves here (TLS SNI, or every HTTP request's Host).
    ByName,
    Refuse(Rule),
}

impl Policy {
    pub fn name_allowed(&self, name: &str) -> bool {
        self.allow.as_ref().is_none_or(|list| list.iter().any(|p| p.matches(name)))
    }

    /// [`Policy::name_allowed`] for a name as DNS carries it: a list of labels.
    pub fn labels_allowed(&self, labels: &[&[u8]]) -> bool {
        self.allow.as_ref().is_none_or(|list| list.iter().any(|p| p.matches_labels(labels)))
    }

    pub fn cidr_allowed(&self, ip: Ipv4Addr) -> bool {
        self.allow_cidrs.iter().any(|c| c.contains(&ip))
    }

    /// The check of a new flow to `ip`; `names` are what the guest resolved to it.
    pub fn check(&self, ip: Ipv4Addr, host: &HostAddrs, names: Vec<String>) -> Verdict {
        if self.cidr_allowed(ip) {
            return Verdict::Allow;
        }
        if let Some(rule) = special(ip) {
            return Verdict::Refuse(rule);
        }
        if host.contains(ip) {
            return Verdict::Refuse(Rule::Host);
        }
        if self.allow.is_none() {
            return Verdict::Allow;
        }
        if names.iter().any(|n| self.name_allowed(n)) {
            Verdict::ByName
        } else {
            Verdict::Refuse(Rule::Allowlist)
        }
    }
}

/// Which names the guest resolved to which addresses, through moat's DNS: what lets an allowlist
/// by name apply to connections by address. Bounded; the oldest answers go first.
#[derive(Debug, Default)]
pub struct Pins {
    by_ip: HashMap<Ipv4Addr, Vec<String>>,
    order: VecDeque<(Ipv4Addr, String)>,
}

impl Pins {
    const MAX: usize = 4096;

    pub fn add(&mut self, name: &str, ip: Ipv4Addr) {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let names = self.by_ip.entry(ip).or_default();
        if names.contains(&name) {
            return;
        }
        names.push(name.clone());
        self.order.push_back((ip, name));
        while self.order.len() > Self::MAX {
            let Some((old_ip, old_name)) = self.order.pop_front() else { break };
            if let Some(v) = self.by_ip.get_mut(&old_ip) {
                v.retain(|n| *n != old_name);
                if v.is_empty() {
                    self.by_ip.remove(&old_ip);
                }
            }
        }
    }

    pub fn names(&self, ip: Ipv4Addr) -> Vec<String> {
        self.by_ip.get(&ip).cloned().unwrap_or_default()
    }

    /// Whether the guest resolved `name` to `ip`.
    pub fn resolved(&self, name: &str, ip: Ipv4Addr) -> bool {
        self.by_ip.get(&ip).is_some_and(|v| v.iter().any(|n| n.eq_ignore_ascii_case(name.trim_end_matches('.'))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_names_and_subdomains() {
        let exact = HostPattern::parse("PyPI.org.").unwrap();
        assert!(exact.matches("pypi.org") && exact.matches("PYPI.ORG.") && !exact.matches("x.pypi.org"));
        let wild = HostPattern::parse("*.pythonhosted.org").unwrap();
        assert!(wild.matches("files.pythonhosted.org") && wild.matches("a.b.pythonhosted.org"));
        assert!(!wild.matches("pythonhosted.org") && !wild.matches("evilpythonhosted.org"));
        assert_eq!(wild.to_string(), "*.pythonhosted.org");
        for bad in ["", "*", "*.org", "1.2.3.4", "a..b", "a b", "-a.org", "http://x.org"] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn names_are_compared_by_label_not_by_escaped_text() {
        let wild = HostPattern::parse("*.allowed.com").unwrap();
        let exact = HostPattern::parse("allowed.com").unwrap();
        // Two labels, `x.allowed` and `com`: DNS writes it `x\.allowed.com`.
        let dotted: [&[u8]; 2] = [b"x.allowed", b"com"];
        assert!(!wild.matches_labels(&dotted) && !exact.matches_labels(&dotted));
        assert!(!wild.matches("x\\.allowed.com"), "an escaped name is no hostname");
        assert!(wild.matches_labels(&[b"x", b"ALLOWED", b"com"]) && wild.matches_labels(&[b"a b", b"allowed", b"com"]));
        assert!(!wild.matches_labels(&[b"allowed", b"com"]) && exact.matches_labels(&[b"allowed", b"com"]));
        assert!(!exact.matches_labels(&[b"com"]) && !exact.matches_labels(&[]));
        let policy = Policy { allow: Some(vec![wild]), ..Policy::default() };
        assert!(!policy.labels_allowed(&dotted) && policy.labels_allowed(&[b"api", b"allowed", b"com"]));
    }

    #[test]
    fn special_ranges_are_refused() {
        let cases = [
            ("127.0.0.1", Some(Rule::Loopback)),
            ("10.1.2.3", Some(Rule::Private)),
            ("172.16.0.1", Some(Rule::Private)),
            ("192.168.1.1", Some(Rule::Private)),
            ("100.64.0.1", Some(Rule::Private)),
            ("100.128.0.1", None),
            ("169.254.169.254", Some(Rule::Metadata)),
            ("100.100.100.200", Some(Rule::Metadata)),
            ("168.63.129.16", Some(Rule::Metadata)),
            ("168.63.129.17", None),
            ("169.254.1.1", Some(Rule::LinkLocal)),
            ("224.0.0.1", Some(Rule::Multicast)),
            ("255.255.255.255", Some(Rule::Multicast)),
            ("0.0.0.0", Some(Rule::Reserved)),
            ("240.0.0.1", Some(Rule::Reserved)),
            ("198.51.100.10", None),
            ("1.1.1.1", None),
        ];
        for (ip, rule) in cases {
            assert_eq!(special(ip.parse().unwrap()), rule, "{ip}");
        }
    }

    #[test]
    fn checks_follow_mode_cidrs_and_pins() {
        let host = HostAddrs::new();
        let public: Ipv4Addr = "198.51.100.10".parse().unwrap();
        let mut p = Policy::default();
        assert_eq!(p.check(public, &host, vec![]), Verdict::Allow);
        assert_eq!(p.check("10.0.0.1".parse().unwrap(), &host, vec![]), Verdict::Refuse(Rule::Private));
        assert_eq!(p.check(Ipv4Addr::LOCALHOST, &host, vec![]), Verdict::Refuse(Rule::Loopback));
        let behind_nat = HostAddrs::with([public]);
        assert_eq!(p.check(public, &behind_nat, vec![]), Verdict::Refuse(Rule::Host));
        p.allow_cidrs.push("127.0.0.1/32".parse().unwrap());
        assert_eq!(p.check(Ipv4Addr::LOCALHOST, &host, vec![]), Verdict::Allow);
        p.allow = Some(vec![HostPattern::parse("api.test").unwrap()]);
        assert_eq!(p.check(public, &host, vec![]), Verdict::Refuse(Rule::Allowlist));
        assert_eq!(p.check(public, &host, vec!["other.test".into()]), Verdict::Refuse(Rule::Allowlist));
        assert_eq!(p.check(public, &host, vec!["other.test".into(), "api.test".into()]), Verdict::ByName);
    }

    #[test]
    fn pins_are_bounded() {
        let mut pins = Pins::default();
        pins.add("a.test.", Ipv4Addr::new(1, 2, 3, 4));
        pins.add("A.test", Ipv4Addr::new(1, 2, 3, 4));
        assert_eq!(pins.names(Ipv4Addr::new(1, 2, 3, 4)), ["a.test"]);
        assert!(pins.resolved("a.TEST", Ipv4Addr::new(1, 2, 3, 4)));
        for i in 0..(Pins::MAX as u32 + 10) {
            pins.add(&format!("n{i}.test"), Ipv4Addr::from(0x0a00_0000 + i));
        }
        assert!(pins.names(Ipv4Addr::new(1, 2, 3, 4)).is_empty());
        assert_eq!(pins.order.len(), Pins::MAX);
    }
}
