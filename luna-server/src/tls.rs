//! TLS for the admin API (`/api/v1` on `[http] api_listen`): the certificate luna makes for
//! itself at `luna-server init`, and the rustls server configuration `serve` loads.
//!
//! Unless the admin configured `[http] tls_cert` and `tls_key`, `init` generates, into
//! `<data_dir>/tls/`:
//! - `ca.pem` / `ca.key`: a self-signed CA (ECDSA P-256, path length 0) named after the cluster;
//!   `ca.pem` is what CLIs trust (the package copies it to `/etc/luna/ca.pem`);
//! - `server.pem` / `server.key`: the API's certificate, signed by that CA, for `localhost`,
//!   127.0.0.1, ::1, the host's name, every address of the host's interfaces at init time, the
//!   `api_listen` address and `[http] tls_names`.
//!
//! Keys are written 0600 (created with that mode, never widened); `serve` tightens a key file that
//! group or others may read, as `fsperm` does for the database. An existing certificate is
//! kept; deleting `server.pem` and running `init` again issues a new one (e.g. for new names)
//! from the same CA, so clients keep trusting it.
//!
//! Generation and name selection are sans-IO ([`generate_ca`], [`issue_server`],
//! [`certificate_names`]); file I/O lives in [`ensure`] and [`server_config`].

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::Config;
use crate::fsperm;

/// Validity of generated certificates. An expired certificate locks the admin out of the API (the
/// boot path is plain HTTP and unaffected); ten years spares a cluster's lifetime of renewals.
const VALIDITY_DAYS: i64 = 3650;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{what} {path} holds no usable PEM {kind}: {reason}")]
    Pem { what: &'static str, path: PathBuf, kind: &'static str, reason: String },
    #[error("certificate {cert} and key {key} do not make a usable TLS configuration: {reason}")]
    Config { cert: PathBuf, key: PathBuf, reason: String },
    #[error("cannot generate the admin API's certificate: {0}")]
    Generate(String),
    #[error("[http] tls_cert and tls_key must be set together (only {0} is set)")]
    HalfConfigured(&'static str),
    #[error(
        "no certificate for the admin API at {cert}: run `luna-server init` to generate one, or set [http] \
         tls_cert and tls_key"
    )]
    Missing { cert: PathBuf },
    #[error(transparent)]
    Perm(#[from] fsperm::PermError),
}

impl From<rcgen::Error> for TlsError {
    fn from(e: rcgen::Error) -> Self {
        TlsError::Generate(e.to_string())
    }
}

/// Where the API's certificate, key and (when luna made them) CA live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `Some` when luna generates the certificate itself (no `[http] tls_cert`).
    pub generated: Option<CaPaths>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsPaths {
    /// The admin's `[http] tls_cert`/`tls_key`, or luna's own under `<data_dir>/tls/`.
    pub fn of(config: &Config) -> Result<TlsPaths, TlsError> {
        match (&config.http.tls_cert, &config.http.tls_key) {
            (Some(cert), Some(key)) => Ok(TlsPaths { cert: cert.clone(), key: key.clone(), generated: None }),
            (Some(_), None) => Err(TlsError::HalfConfigured("tls_cert")),
            (None, Some(_)) => Err(TlsError::HalfConfigured("tls_key")),
            (None, None) => {
                let dir = tls_dir(&config.data_dir);
                Ok(TlsPaths {
                    cert: dir.join("server.pem"),
                    key: dir.join("server.key"),
                    generated: Some(CaPaths { cert: dir.join("ca.pem"), key: dir.join("ca.key") }),
                })
            }
        }
    }
}

/// `<data_dir>/tls`.
pub fn tls_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("tls")
}

/// A CA or server certificate with its key, as PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The CA's parameters, a function of the cluster name and the CA key only (so a re-issue
/// rebuilds the same issuer). The name carries a digest of the public key: two clusters of the
/// same name have distinct issuers, and a client trusting the other one's CA is told "unknown
/// issuer", not "bad signature".
fn ca_params(cluster: &str, key: &KeyPair) -> Result<CertificateParams, TlsError> {
    use sha2::Digest as _;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    let id = hex::encode(&sha2::Sha256::digest(key.public_key_raw())[..6]);
    dn.push(DnType::OrganizationName, "luna");
    dn.push(DnType::CommonName, format!("luna CA for cluster {cluster} ({id})"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = time_now();
    p.not_before = now - rcgen_days(1);
    p.not_after = now + rcgen_days(VALIDITY_DAYS);
    Ok(p)
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn rcgen_days(d: i64) -> time::Duration {
    time::Duration::days(d)
}

/// A fresh self-signed CA for `cluster`.
pub fn generate_ca(cluster: &str) -> Result<Issued, TlsError> {
    let key = KeyPair::generate()?;
    let cert = ca_params(cluster, &key)?.self_signed(&key)?;
    Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// A server certificate for `names` (DNS names or IP addresses), signed by the CA whose key is
/// `ca_key_pem` (the CA's certificate is rebuilt from the same name and key: what a client checks,
/// issuer name and signature, is the same as for the `ca.pem` it holds).
pub fn issue_server(cluster: &str, ca_key_pem: &str, names: &[String]) -> Result<Issued, TlsError> {
    let ca_key = KeyPair::from_pem(ca_key_pem)?;
    let ca = ca_params(cluster, &ca_key)?.self_signed(&ca_key)?;
    let mut p = CertificateParams::new(names.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "luna");
    dn.push(DnType::CommonName, names.first().cloned().unwrap_or_else(|| "luna-server".into()));
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.use_authority_key_identifier_extension = true;
    let now = time_now();
    p.not_before = now - rcgen_days(1);
    p.not_after = now + rcgen_days(VALIDITY_DAYS);
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &ca, &ca_key)?;
    Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// The names a generated server certificate carries, deduplicated, in a stable order:
/// `localhost`, loopback, the host name, the API's own address (unless it is 0.0.0.0/::), the
/// host's interface addresses, then the admin's `extra` names.
pub fn certificate_names(
    hostname: Option<&str>,
    api_ip: IpAddr,
    interface_ips: &[IpAddr],
    extra: &[String],
) -> Vec<String> {
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    if let Some(h) = hostname.map(str::trim).filter(|h| !h.is_empty()) {
        names.push(h.to_string());
    }
    if !api_ip.is_unspecified() {
        names.push(api_ip.to_string());
    }
    for ip in interface_ips {
        // Link-local IPv6 addresses need a zone a URL cannot carry usefully.
        let link_local_v6 = matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
        if !link_local_v6 {
            names.push(ip.to_string());
        }
    }
    names.extend(extra.iter().map(|n| n.trim().to_string()).filter(|n| !n.is_empty()));
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.to_ascii_lowercase()));
    names
}

/// What [`ensure`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ensured {
    /// The admin's `[http] tls_cert`/`tls_key` load.
    Configured { cert: PathBuf },
    /// luna's certificate was there already.
    Kept { cert: PathBuf, ca: PathBuf },
    /// A certificate was generated (and a CA, when `new_ca`) for `names`.
    Generated { cert: PathBuf, ca: PathBuf, new_ca: bool, names: Vec<String> },
}

/// `luna-server init`'s part: makes sure the admin API has a certificate (see the module docs).
pub fn ensure(config: &Config) -> Result<Ensured, TlsError> {
    let paths = TlsPaths::of(config)?;
    let Some(ca) = &paths.generated else {
        server_config(&paths)?;
        return Ok(Ensured::Configured { cert: paths.cert });
    };
    if paths.cert.exists() && paths.key.exists() {
        server_config(&paths)?;
        return Ok(Ensured::Kept { cert: paths.cert, ca: ca.cert.clone() });
    }
    fsperm::secure_dir(&tls_dir(&config.data_dir))?;
    let new_ca = !(ca.cert.exists() && ca.key.exists());
    let ca_key_pem = if new_ca {
        let issued = generate_ca(&config.cluster_name)?;
        write_new(&ca.key, issued.key_pem.as_bytes(), fsperm::FILE_MODE)?;
        write_new(&ca.cert, issued.cert_pem.as_bytes(), 0o644)?;
        issued.key_pem
    } else {
        read(&ca.key, "CA key")?
    };
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
    let names =
        certificate_names(hostname.as_deref(), config.http.api_listen.ip(), &interface_ips(), &config.http.tls_names);
    let server = issue_server(&config.cluster_name, &ca_key_pem, &names)?;
    write_new(&paths.key, server.key_pem.as_bytes(), fsperm::FILE_MODE)?;
    write_new(&paths.cert, server.cert_pem.as_bytes(), 0o644)?;
    server_config(&paths)?;
    Ok(Ensured::Generated { cert: paths.cert, ca: ca.cert.clone(), new_ca, names })
}

/// Copies luna's CA certificate to `dest` (mode 0644, replaced atomically), for clients on this
/// host. `false` when the admin configured `[http] tls_cert` (luna has no CA of its own).
pub fn export_ca(config: &Config, dest: &Path) -> Result<bool, TlsError> {
    let Some(ca) = TlsPaths::of(config)?.generated else { return Ok(false) };
    let pem = read(&ca.cert, "CA certificate")?;
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem {
        what: "CA certificate",
        path: ca.cert.clone(),
        kind: "certificate",
        reason: e.to_string(),
    })?;
    let tmp = dest.with_extension("pem.tmp");
    let _ = std::fs::remove_file(&tmp);
    write_new(&tmp, pem.as_bytes(), 0o644)?;
    std::fs::rename(&tmp, dest).map_err(|source| TlsError::Write { path: dest.into(), source })?;
    Ok(true)
}

/// The host's interface addresses (none if they cannot be listed: the other names still work).
fn interface_ips() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    addrs
        .filter_map(|a| a.address)
        .filter_map(|s| {
            if let Some(v4) = s.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

fn read(path: &Path, what: &'static str) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read { what, path: path.into(), source })
}

/// Writes a new file created with `mode` (never replacing one: a concurrent `init` loses).
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| TlsError::Write { path: path.into(), source };
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}

/// Loads certificate and key into a rustls server configuration (HTTP/1.1 by ALPN), after
/// tightening the key file to owner-only if group or others may read it.
pub fn server_config(paths: &TlsPaths) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    if !paths.cert.exists() && paths.generated.is_some() {
        return Err(TlsError::Missing { cert: paths.cert.clone() });
    }
    fsperm::secure(&paths.key, fsperm::FILE_MODE)?;
    let cert_text = std::fs::read(&paths.cert).map_err(|source| TlsError::Read {
        what: "certificate",
        path: paths.cert.clone(),
        source,
    })?;
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&cert_text).collect::<Result<_, _>>().map_err(|e| TlsError::Pem {
            what: "certificate",
            path: paths.cert.clone(),
            kind: "certificate",
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what: "certificate",
            path: paths.cert.clone(),
            kind: "certificate",
            reason: "no CERTIFICATE block".into(),
        });
    }
    let key_text =
        std::fs::read(&paths.key).map_err(|source| TlsError::Read { what: "key", path: paths.key.clone(), source })?;
    let key = PrivateKeyDer::from_pem_slice(&key_text).map_err(|e| TlsError::Pem {
        what: "key",
        path: paths.key.clone(),
        kind: "private key",
        reason: e.to_string(),
    })?;
    let cfg_err = |reason: String| TlsError::Config { cert: paths.cert.clone(), key: paths.key.clone(), reason };
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| cfg_err(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| cfg_err(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier as _;
    use rustls::pki_types::{ServerName, UnixTime};

    fn verify(ca_pem: &str, cert_pem: &str, name: &str) -> Result<(), rustls::Error> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap();
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
        verifier
            .verify_server_cert(&cert, &[], &ServerName::try_from(name.to_string()).unwrap(), &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn server_certificate_verifies_for_its_names_only_and_against_its_ca_only() {
        let ca = generate_ca("c1").unwrap();
        let names = certificate_names(Some("head1\n"), "10.1.0.1".parse().unwrap(), &[], &["luna.example".into()]);
        let server = issue_server("c1", &ca.key_pem, &names).unwrap();
        for n in ["localhost", "127.0.0.1", "head1", "10.1.0.1", "luna.example"] {
            verify(&ca.cert_pem, &server.cert_pem, n).unwrap_or_else(|e| panic!("{n}: {e}"));
        }
        let e = verify(&ca.cert_pem, &server.cert_pem, "other.example").unwrap_err();
        assert!(e.to_string().contains("not valid for name"), "{e}");
        let other = generate_ca("c1").unwrap();
        let e = verify(&other.cert_pem, &server.cert_pem, "localhost").unwrap_err();
        assert!(e.to_string().contains("UnknownIssuer"), "{e}");
        // A re-issue from the same CA key verifies against the CA clients already hold.
        let again = issue_server("c1", &ca.key_pem, &["new.example".into()]).unwrap();
        verify(&ca.cert_pem, &again.cert_pem, "new.example").unwrap();
    }

    #[test]
    fn names_are_deduplicated_and_skip_wildcard_and_link_local_addresses() {
        let ips: Vec<IpAddr> =
            ["127.0.0.1", "10.0.0.5", "fe80::1", "fd00::5"].iter().map(|s| s.parse().unwrap()).collect();
        let names = certificate_names(Some("Head"), "0.0.0.0".parse().unwrap(), &ips, &["head".into(), " ".into()]);
        assert_eq!(names, ["localhost", "127.0.0.1", "::1", "Head", "10.0.0.5", "fd00::5"]);
    }

    fn config_in(dir: &Path) -> Config {
        Config { data_dir: dir.join("data"), cluster_name: "t".into(), ..Config::default() }
    }

    #[test]
    fn ensure_generates_owner_only_keys_once_and_keeps_them() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let mut config = config_in(d.path());
        config.http.tls_names = vec!["luna.test".into()];
        let Ensured::Generated { new_ca: true, names, .. } = ensure(&config).unwrap() else { panic!("not generated") };
        assert!(names.contains(&"luna.test".to_string()));
        let dir = tls_dir(&config.data_dir);
        let mode = |f: &str| std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode("ca.key"), mode("server.key")), (0o600, 0o600));
        assert_eq!((mode("ca.pem"), mode("server.pem")), (0o644, 0o644));
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        let ca = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
        assert!(matches!(ensure(&config).unwrap(), Ensured::Kept { .. }));
        assert_eq!(std::fs::read_to_string(dir.join("ca.pem")).unwrap(), ca);
        // A deleted server certificate is issued again by the same CA.
        std::fs::remove_file(dir.join("server.pem")).unwrap();
        std::fs::remove_file(dir.join("server.key")).unwrap();
        assert!(matches!(ensure(&config).unwrap(), Ensured::Generated { new_ca: false, .. }));
        verify(&ca, &std::fs::read_to_string(dir.join("server.pem")).unwrap(), "luna.test").unwrap();
        // A key others may read is tightened when it is loaded.
        std::fs::set_permissions(dir.join("server.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
        server_config(&TlsPaths::of(&config).unwrap()).unwrap();
        assert_eq!(mode("server.key"), 0o600);
    }

    #[test]
    fn the_ca_is_exported_world_readable_and_only_luna_s_own() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let mut config = config_in(d.path());
        ensure(&config).unwrap();
        let dest = d.path().join("ca.pem");
        assert!(export_ca(&config, &dest).unwrap());
        assert!(export_ca(&config, &dest).unwrap(), "a second export replaces the first");
        assert_eq!(std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777, 0o644);
        let ca = std::fs::read_to_string(tls_dir(&config.data_dir).join("ca.pem")).unwrap();
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), ca);
        config.http.tls_cert = Some("/c".into());
        config.http.tls_key = Some("/k".into());
        assert!(!export_ca(&config, &d.path().join("other.pem")).unwrap());
        assert!(!d.path().join("other.pem").exists());
    }

    #[test]
    fn bad_or_missing_configuration_is_named() {
        let d = tempfile::tempdir().unwrap();
        let mut config = config_in(d.path());
        let e = server_config(&TlsPaths::of(&config).unwrap()).unwrap_err().to_string();
        assert!(e.contains("server.pem") && e.contains("luna-server init"), "{e}");
        config.http.tls_cert = Some(d.path().join("c.pem"));
        assert!(TlsPaths::of(&config).unwrap_err().to_string().contains("only tls_cert"));
        config.http.tls_key = Some(d.path().join("k.pem"));
        std::fs::write(d.path().join("c.pem"), "not pem").unwrap();
        std::fs::write(d.path().join("k.pem"), "not pem").unwrap();
        let e = ensure(&config).unwrap_err().to_string();
        assert!(e.contains("c.pem") && e.contains("certificate"), "{e}");
        // A key that does not belong to the certificate.
        let ca = generate_ca("t").unwrap();
        let server = issue_server("t", &ca.key_pem, &["x".into()]).unwrap();
        std::fs::write(d.path().join("c.pem"), &server.cert_pem).unwrap();
        std::fs::write(d.path().join("k.pem"), &ca.key_pem).unwrap();
        let e = ensure(&config).unwrap_err().to_string();
        assert!(e.contains("c.pem") && e.contains("k.pem"), "{e}");
        std::fs::write(d.path().join("k.pem"), &server.key_pem).unwrap();
        assert!(matches!(ensure(&config).unwrap(), Ensured::Configured { .. }));
    }
}
