//! The name a guest connection speaks to: TLS SNI from the ClientHello (parsed by rustls) or the
//! HTTP Host header (parsed by httparse), read from the first bytes the guest sends.

/// What the first bytes of a connection say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// A TLS ClientHello, with its server name if it has one.
    Tls(Option<String>),
    /// An HTTP/1 request head, with its Host (port removed) if it has one.
    Http(Option<String>),
    /// Something else: no name to check.
    Other,
    /// Not enough bytes yet to tell.
    NeedMore,
}

/// Most bytes read before giving up on finding a name.
pub const MAX_SNIFF: usize = 16 * 1024;

pub fn sniff(buf: &[u8]) -> Sniffed {
    if buf.is_empty() {
        return Sniffed::NeedMore;
    }
    if buf[0] == 0x16 {
        return tls(buf);
    }
    if buf[0].is_ascii_uppercase() {
        return http(buf);
    }
    Sniffed::Other
}

fn tls(buf: &[u8]) -> Sniffed {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rest = buf;
    while !rest.is_empty() {
        match acceptor.read_tls(&mut rest) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => Sniffed::Tls(accepted.client_hello().server_name().map(|s| s.to_ascii_lowercase())),
        Ok(None) if buf.len() < MAX_SNIFF => Sniffed::NeedMore,
        _ => Sniffed::Other,
    }
}

fn http(buf: &[u8]) -> Sniffed {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {
            let host = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("host"))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .map(|v| strip_port(v.trim()).to_ascii_lowercase());
            Sniffed::Http(host)
        }
        Ok(httparse::Status::Partial) if buf.len() < MAX_SNIFF => Sniffed::NeedMore,
        _ => Sniffed::Other,
    }
}

fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !h.contains(':') => h,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_host_without_port() {
        let req = b"GET / HTTP/1.1\r\nHost: API.test:8080\r\nAccept: */*\r\n\r\n";
        assert_eq!(sniff(req), Sniffed::Http(Some("api.test".into())));
        assert_eq!(sniff(&req[..20]), Sniffed::NeedMore);
        assert_eq!(sniff(b"GET / HTTP/1.0\r\n\r\n"), Sniffed::Http(None));
        assert_eq!(sniff(b"SSH-2.0-OpenSSH\r\n"), Sniffed::Other);
        assert_eq!(sniff(b"\x00\x01binary"), Sniffed::Other);
        assert_eq!(sniff(b""), Sniffed::NeedMore);
    }

    #[test]
    fn tls_server_name_from_a_real_client_hello() {
        let hello = client_hello("api.test");
        assert_eq!(sniff(&hello), Sniffed::Tls(Some("api.test".into())));
        assert_eq!(sniff(&hello[..hello.len() / 2]), Sniffed::NeedMore);
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let hello = client_hello("x.test");
        for _ in 0..5000 {
            let mut buf = hello.clone();
            for _ in 0..4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let i = (seed as usize) % buf.len();
                buf[i] = (seed >> 32) as u8;
            }
            buf.truncate((seed as usize >> 8) % (buf.len() + 1));
            let _ = sniff(&buf);
            let _ = sniff(&buf[1.min(buf.len())..]);
        }
    }

    fn client_hello(name: &str) -> Vec<u8> {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let mut conn =
            rustls::ClientConnection::new(std::sync::Arc::new(config), name.to_string().try_into().unwrap()).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }
}
