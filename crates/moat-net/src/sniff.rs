//! The name a guest's TLS connection speaks to: the server name (SNI) of its ClientHello, parsed
//! by rustls from the first bytes the guest sends. (Plain HTTP is checked request by request by
//! the allowlist gate, which parses it with hyper.)

/// What the first bytes of a connection say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// A TLS ClientHello, with its server name if it has one.
    Tls(Option<String>),
    /// The first byte is not that of a TLS handshake record.
    NotTls,
    /// A TLS handshake record that holds no ClientHello rustls accepts.
    Invalid,
    /// Not enough bytes yet to tell.
    NeedMore,
}

/// Most bytes read to find a ClientHello's end; a longer one is refused in allowlist mode.
pub const MAX_SNIFF: usize = 16 * 1024;

pub fn sniff(buf: &[u8]) -> Sniffed {
    match buf.first() {
        None => Sniffed::NeedMore,
        Some(0x16) => tls(buf),
        Some(_) => Sniffed::NotTls,
    }
}

fn tls(buf: &[u8]) -> Sniffed {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rest = buf;
    while !rest.is_empty() {
        match acceptor.read_tls(&mut rest) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return Sniffed::Invalid,
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => Sniffed::Tls(accepted.client_hello().server_name().map(|s| s.to_ascii_lowercase())),
        Ok(None) => Sniffed::NeedMore,
        Err(_) => Sniffed::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tls_is_read() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n"), Sniffed::NotTls);
        assert_eq!(sniff(b"\r\nGET / HTTP/1.1\r\n"), Sniffed::NotTls);
        assert_eq!(sniff(b""), Sniffed::NeedMore);
        assert_eq!(sniff(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00"), Sniffed::Invalid, "a ServerHello");
    }

    #[test]
    fn tls_server_name_from_a_real_client_hello() {
        let hello = client_hello("api.test");
        assert_eq!(sniff(&hello), Sniffed::Tls(Some("api.test".into())));
        assert_eq!(sniff(&hello[..hello.len() / 2]), Sniffed::NeedMore);
        assert_eq!(sniff(&hello_of(false, "api.test")), Sniffed::Tls(None));
    }

    #[test]
    fn an_oversized_hello_reads_as_unfinished_within_max_sniff() {
        // A 40 KiB ClientHello in 16 KiB records, as a client would send it.
        let len = 40 << 10;
        let mut message = vec![1u8, (len >> 16) as u8, (len >> 8) as u8, len as u8];
        message.extend(std::iter::repeat_n(0x41, len));
        let mut hello = Vec::new();
        for record in message.chunks(16 * 1024) {
            hello.extend_from_slice(&[0x16, 0x03, 0x01, (record.len() >> 8) as u8, record.len() as u8]);
            hello.extend_from_slice(record);
        }
        for n in (1..=hello.len()).step_by(509) {
            assert_eq!(sniff(&hello[..n.min(MAX_SNIFF)]), Sniffed::NeedMore, "after {n} bytes");
        }
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
        hello_of(true, name)
    }

    fn hello_of(sni: bool, name: &str) -> Vec<u8> {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.enable_sni = sni;
        let mut conn =
            rustls::ClientConnection::new(std::sync::Arc::new(config), name.to_string().try_into().unwrap()).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }
}
