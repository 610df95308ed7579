//! The per-sandbox certificate authority, and the leaves it issues for the hosts secrets are
//! bound to.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{RootCertStore, ServerConfig};

use super::{normalize_host, provider, TlsError, ALPN_HTTP1};

/// Leaves kept per CA; a sandbox talks to a handful of secret hosts, so this only bounds a guest
/// that makes up names.
const MAX_CACHED_LEAVES: usize = 256;
/// Leaves are valid this long and reissued after `LEAF_REFRESH`, so a long-lived daemon never
/// serves an expired one.
const LEAF_VALIDITY: time::Duration = time::Duration::days(90);
const LEAF_REFRESH: Duration = Duration::from_secs(30 * 24 * 3600);
/// Certificates start a day early so a guest clock that lags a little still accepts them.
const BACKDATE: time::Duration = time::Duration::days(1);
const CA_VALIDITY: time::Duration = time::Duration::days(3652);

/// A per-sandbox certificate authority (ECDSA P-256). Its PEM is what the daemon stores, what
/// forks inherit, and what goes into the guest's trust store.
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
    leaves: Mutex<HashMap<String, Leaf>>,
}

struct Leaf {
    issued: Instant,
    config: Arc<ServerConfig>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

impl Ca {
    /// A new CA named "moat sandbox CA `label`", valid for ten years.
    pub fn generate(label: &str) -> Result<Ca, TlsError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(TlsError::CaGenerate)?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, format!("moat sandbox CA {label}"));
        name.push(DnType::OrganizationName, "moat");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;
        let cert = params.self_signed(&key).map_err(TlsError::CaGenerate)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA stored by [`Ca::cert_pem`] and [`Ca::key_pem`]. Fails if the key is not the
    /// certificate's.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, TlsError> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|source| TlsError::CaLoad { what: "reading its key", reason: source })?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|source| TlsError::CaLoad { what: "reading its certificate", reason: source })?;
        let ca = Ca {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer,
            leaves: Mutex::new(HashMap::new()),
        };
        ca.check_signs_for_itself()?;
        Ok(ca)
    }

    /// The CA certificate, PEM; the guest trusts it.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PKCS#8 PEM; never give it to the guest.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A TLS server configuration presenting a leaf for `host` signed by this CA, offering only
    /// HTTP/1.1. Leaves are cached per host.
    pub(crate) fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, TlsError> {
        let host = normalize_host(host);
        let mut leaves = self.leaves.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(leaf) = leaves.get(&host) {
            if leaf.issued.elapsed() < LEAF_REFRESH {
                return Ok(leaf.config.clone());
            }
        }
        let (cert, key) = self.issue(&host)?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .map_err(TlsError::Config)?;
        config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        let config = Arc::new(config);
        if leaves.len() >= MAX_CACHED_LEAVES && !leaves.contains_key(&host) {
            let evict = leaves.iter().min_by_key(|(_, leaf)| leaf.issued).map(|(name, _)| name.clone());
            if let Some(name) = evict {
                leaves.remove(&name);
            }
        }
        leaves.insert(host, Leaf { issued: Instant::now(), config: config.clone() });
        Ok(config)
    }

    fn issue(&self, host: &str) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), TlsError> {
        let leaf_error = |reason| TlsError::Leaf { host: host.to_owned(), reason };
        // rcgen takes any IA5 string as a DNS name; a guest must not get a leaf for "a b".
        ServerName::try_from(host).map_err(|_| TlsError::InvalidHost(host.to_owned()))?;
        let san = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.try_into().map_err(|_| TlsError::InvalidHost(host.to_owned()))?),
        };
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, host);
        params.distinguished_name = name;
        params.subject_alt_names = vec![san];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + LEAF_VALIDITY;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(leaf_error)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(leaf_error)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((cert.der().clone(), key))
    }

    /// Catches a key stored next to the wrong certificate before any guest sees a leaf it rejects.
    fn check_signs_for_itself(&self) -> Result<(), TlsError> {
        const PROBE: &str = "ca-check.moat.invalid";
        let ca_cert = CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).map_err(|e| {
            TlsError::CaMismatch(rustls::Error::General(format!("the certificate PEM does not parse: {e}")))
        })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca_cert).map_err(TlsError::CaMismatch)?;
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsError::CaMismatch(rustls::Error::General(e.to_string())))?;
        let (leaf, _) = self.issue(PROBE)?;
        let name = ServerName::try_from(PROBE).expect("the probe name is a valid DNS name");
        verifier.verify_server_cert(&leaf, &[], &name, &[], UnixTime::now()).map_err(TlsError::CaMismatch)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_are_cached_per_host_and_the_cache_is_bounded() {
        let ca = Ca::generate("cache").unwrap();
        let first = ca.server_config("api.test").unwrap();
        assert!(Arc::ptr_eq(&first, &ca.server_config("API.test.").unwrap()), "the same host reuses its leaf");
        assert!(!Arc::ptr_eq(&first, &ca.server_config("other.test").unwrap()));
        for i in 0..MAX_CACHED_LEAVES + 10 {
            ca.server_config(&format!("host{i}.test")).unwrap();
        }
        assert_eq!(ca.leaves.lock().unwrap().len(), MAX_CACHED_LEAVES);
        assert!(matches!(ca.server_config("not a host"), Err(TlsError::InvalidHost(_))));
    }

    #[test]
    fn the_ca_is_a_ca_named_after_its_label() {
        let ca = Ca::generate("sbx-123").unwrap();
        let der = CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap();
        let issuer = Issuer::from_ca_cert_der(&der, KeyPair::from_pem(ca.key_pem()).unwrap()).unwrap();
        assert!(issuer.key_usages().contains(&KeyUsagePurpose::KeyCertSign));
        assert!(format!("{issuer:?}").contains("moat sandbox CA sbx-123"), "{issuer:?}");
    }
}
