//! moat's resolver, the only DNS server a guest has: it answers `--add-host` names itself, refuses
//! names off the allowlist, asks the upstream resolvers (hickory) for the rest, and pins every
//! address it hands out to the name asked for, so later flows are checked against that name.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Mutex;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{RData, Record, RecordType};
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;

use crate::policy::{Pins, Policy};
use crate::{NetError, HOST_IP, HOST_NAME};

/// What moat's DNS says to one query.
pub struct Answer {
    /// The response packet; `None` when the query was not a DNS query at all.
    pub packet: Option<Vec<u8>>,
    /// The name refused by the allowlist, if one was.
    pub refused: Option<String>,
}

pub struct Dns {
    resolver: TokioResolver,
}

impl Dns {
    /// A resolver asking `upstreams`, or the host's own resolvers (`/etc/resolv.conf`) when there
    /// are none.
    pub fn new(upstreams: &[SocketAddr]) -> Result<Dns, NetError> {
        let mut opts = ResolverOpts::default();
        opts.timeout = std::time::Duration::from_secs(3);
        opts.attempts = 2;
        let builder = if upstreams.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| {
                NetError::Invalid(format!(
                    "cannot read the host's DNS configuration ({e}); give the sandbox resolvers with --dns IP"
                ))
            })?
        } else {
            let servers = upstreams
                .iter()
                .map(|s| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = s.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = s.port();
                    NameServerConfig::new(s.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let mut builder = builder;
        *builder.options_mut() = opts;
        let resolver = builder.build().map_err(|e| NetError::Invalid(format!("cannot set up DNS: {e}")))?;
        Ok(Dns { resolver })
    }

    pub async fn answer(&self, query: &[u8], policy: &Policy, pins: &Mutex<Pins>) -> Answer {
        let Ok(request) = Message::from_vec(query) else {
            return Answer { packet: None, refused: None };
        };
        if request.metadata.message_type != MessageType::Query {
            return Answer { packet: None, refused: None };
        }
        let mut response = Message::response(request.metadata.id, request.metadata.op_code);
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.metadata.recursion_available = true;
        let [question] = request.queries.as_slice() else {
            response.metadata.response_code = ResponseCode::FormErr;
            return Answer { packet: response.to_vec().ok(), refused: None };
        };
        response.add_query(question.clone());
        if request.metadata.op_code != OpCode::Query {
            response.metadata.response_code = ResponseCode::NotImp;
            return Answer { packet: response.to_vec().ok(), refused: None };
        }
        let qname = question.name().clone();
        let name = qname.to_ascii().trim_end_matches('.').to_ascii_lowercase();
        let qtype = question.query_type();
        let pin = |ip: Ipv4Addr| pins.lock().unwrap_or_else(|e| e.into_inner()).add(&name, ip);
        let fixed = if name == HOST_NAME { Some(HOST_IP) } else { policy.hosts.get(&name).copied() };
        let mut refused = None;
        if let Some(ip) = fixed {
            if qtype == RecordType::A || qtype == RecordType::ANY {
                pin(ip);
                response.add_answer(Record::from_rdata(qname, 60, RData::A(ip.into())));
            }
        } else if !policy.labels_allowed(&qname.iter().collect::<Vec<_>>()) {
            // By label: `name` is the escaped presentation form, where `x\.allowed.com` (a label
            // with a dot in it) would pass for a name below `allowed.com`.
            response.metadata.response_code = ResponseCode::NXDomain;
            refused = Some(name);
        } else if qtype == RecordType::AAAA {
            // The guest has no IPv6 route: an empty answer makes clients use IPv4 at once.
        } else {
            match self.resolver.lookup(qname, qtype).await {
                Ok(lookup) => {
                    for record in lookup.answers() {
                        if let RData::A(a) = &record.data {
                            pin(a.0);
                        }
                        response.add_answer(record.clone());
                    }
                }
                Err(e) if e.is_nx_domain() => response.metadata.response_code = ResponseCode::NXDomain,
                Err(e) if e.is_no_records_found() => {}
                Err(e) => {
                    tracing::debug!("upstream DNS for {name}: {e}");
                    response.metadata.response_code = ResponseCode::ServFail;
                }
            }
        }
        let mut packet = response.to_vec().ok();
        // A UDP answer must fit the client's buffer; 512 bytes without EDNS.
        if packet.as_ref().is_some_and(|p| p.len() > 512) {
            packet = response.truncate().to_vec().ok();
        }
        Answer { packet, refused }
    }
}

/// Parse `--dns` values: `IP` or `IP:PORT`.
pub fn parse_upstream(s: &str) -> Result<SocketAddr, NetError> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    s.parse::<SocketAddr>()
        .map_err(|_| NetError::Invalid(format!("--dns {s:?} is not an address: use IP or IP:PORT, e.g. 1.1.1.1")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::HostPattern;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    #[tokio::test]
    async fn a_label_with_a_dot_in_it_is_not_a_name_below_an_allowed_one() {
        // The resolver is never asked: a refused name is answered before that.
        let dns = Dns::new(&["127.0.0.1:9".parse().unwrap()]).unwrap();
        let policy = Policy { allow: Some(vec![HostPattern::parse("*.allowed.com").unwrap()]), ..Policy::default() };
        let pins = Mutex::new(Pins::default());
        let name = Name::from_labels(vec![&b"x.allowed"[..], b"com"]).unwrap();
        let mut query = Message::query();
        query.add_query(Query::query(name, RecordType::A));
        let answer = dns.answer(&query.to_vec().unwrap(), &policy, &pins).await;
        assert_eq!(answer.refused.as_deref(), Some("x\\.allowed.com"));
        let response = Message::from_vec(&answer.packet.unwrap()).unwrap();
        assert_eq!(response.metadata.response_code, ResponseCode::NXDomain);
    }
}
