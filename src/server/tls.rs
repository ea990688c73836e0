//! TLS for an `https://` server: which certificate authorities the agent trusts (the
//! system store plus the lab's own bundle named in the environment), and one readable
//! sentence for a handshake the agent refused. rustls types stay here and in `client`.
//!
//! Trust is the union of
//! - the platform store: the first system bundle found ([`SYSTEM_BUNDLES`], where
//!   `update-ca-certificates` and `update-ca-trust` write) and the files of every
//!   directory in `SSL_CERT_DIR`;
//! - every bundle named by [`BUNDLE_VARIABLES`] (a PEM file, or a directory of them).
//!
//! Only when no platform store is found at all are Mozilla's roots built into the agent
//! (webpki-roots) used, and then only if no bundle was named either: ureq takes either its
//! built-in roots or a list of certificates, never both.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{CertificateError, Error as TlsError, InvalidMessage};
use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

/// The system bundles, the first one holding a certificate wins: Debian and Ubuntu,
/// Fedora and RHEL (two paths), openSUSE, Alpine and the BSDs.
pub(super) const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Variables naming a bundle added to the platform store: the two that Python's requests
/// reads (so a lab's setting for the Python agent carries over) and OpenSSL's.
pub(super) const BUNDLE_VARIABLES: &[&str] =
    &["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"];

/// OpenSSL's variable for directories of certificates (`:`-separated), part of the
/// platform store.
pub(super) const CERT_DIR_VARIABLE: &str = "SSL_CERT_DIR";

/// A file larger than this is not a certificate bundle (the system one is about 200 KiB).
const MAX_BUNDLE: u64 = 16 * 1024 * 1024;

/// The certificates the agent trusts, where they came from, and what could not be used.
#[derive(Debug)]
pub(super) struct Trust {
    certs: Vec<CertificateDer<'static>>,
    /// `/etc/ssl/certs/ca-certificates.crt (146 certificates)`, one entry per source used.
    sources: Vec<String>,
    /// One sentence per bundle or directory that was named but could not be used.
    warnings: Vec<String>,
    /// Whether a platform store (a system bundle or `SSL_CERT_DIR`) held a certificate.
    platform_found: bool,
}

impl Trust {
    /// Reads the platform store and the bundles named in the process environment.
    pub(super) fn load() -> Trust {
        Trust::load_from(|name| std::env::var_os(name), SYSTEM_BUNDLES)
    }

    /// [`Trust::load`] with the environment and the system bundle paths given.
    pub(super) fn load_from(env: impl Fn(&str) -> Option<OsString>, system: &[&str]) -> Trust {
        let mut trust = Trust {
            certs: Vec::new(),
            sources: Vec::new(),
            warnings: Vec::new(),
            platform_found: false,
        };
        let mut seen = HashSet::new();
        for path in system {
            let path = Path::new(path);
            if let Ok((certs, _)) = read_pem_file(path) {
                if trust.add(&mut seen, certs, path.display().to_string()) > 0 {
                    trust.platform_found = true;
                    break;
                }
            }
        }
        for dir in set_var(&env, CERT_DIR_VARIABLE)
            .iter()
            .flat_map(std::env::split_paths)
            .filter(|d| !d.as_os_str().is_empty())
        {
            let label = format!("{CERT_DIR_VARIABLE} directory {}", dir.display());
            match read_pem_dir(&dir) {
                Ok(certs) if certs.is_empty() => trust.warnings.push(format!(
                    "{label} holds no PEM certificate; it adds nothing to the trusted roots"
                )),
                Ok(certs) => {
                    if trust.add(&mut seen, certs, label) > 0 {
                        trust.platform_found = true;
                    }
                }
                Err(e) => trust.warnings.push(format!(
                    "{label} cannot be read ({e}); it adds nothing to the trusted roots"
                )),
            }
        }
        // Warnings about a bundle left out end with what is trusted without it, known
        // once every source has been read.
        let mut left_out = Vec::new();
        let mut named: Vec<PathBuf> = Vec::new();
        for variable in BUNDLE_VARIABLES {
            let Some(value) = set_var(&env, variable) else {
                continue;
            };
            let path = PathBuf::from(value);
            if named.contains(&path) {
                continue;
            }
            named.push(path.clone());
            let label = format!("{variable}={}", path.display());
            match read_bundle(&path) {
                Ok((certs, problem)) => {
                    let usable = usable(&certs);
                    if usable == 0 {
                        let why = problem.unwrap_or_else(|| {
                            if certs.is_empty() {
                                "holds no PEM certificate (no -----BEGIN CERTIFICATE----- block)"
                                    .to_string()
                            } else {
                                "holds no certificate usable as a trust root".to_string()
                            }
                        });
                        left_out.push(format!("{label}: the bundle {why}"));
                        continue;
                    }
                    if let Some(problem) = problem {
                        trust.warnings.push(format!(
                            "{label}: the bundle {problem}; what comes after it is not read ({} \
                             trusted from this bundle)",
                            plural(certs.len())
                        ));
                    }
                    trust.add(&mut seen, certs, label);
                }
                Err(e) => left_out.push(format!("{label}: the bundle cannot be read ({e})")),
            }
        }
        let fallback = trust.fallback_description();
        trust.warnings.extend(
            left_out
                .into_iter()
                .map(|w| format!("{w}; trusting {fallback} without it")),
        );
        trust
    }

    /// Adds the certificates not seen yet; returns how many certificates the source held.
    fn add(
        &mut self,
        seen: &mut HashSet<Vec<u8>>,
        certs: Vec<CertificateDer<'static>>,
        label: String,
    ) -> usize {
        let count = certs.len();
        if count == 0 {
            return 0;
        }
        for cert in certs {
            if seen.insert(cert.as_ref().to_vec()) {
                self.certs.push(cert);
            }
        }
        self.sources.push(format!("{label} ({})", plural(count)));
        count
    }

    /// What is trusted when a named bundle is left out (for its warning).
    fn fallback_description(&self) -> String {
        if self.sources.is_empty() {
            "Mozilla's roots built into the agent (no system CA bundle found)".to_string()
        } else {
            self.sources.join(" and ")
        }
    }

    /// What the agent trusts, for the start-up log line and the unknown-issuer message.
    pub(super) fn summary(&self) -> String {
        if self.certs.is_empty() {
            return format!(
                "Mozilla's roots built into the agent (no system CA bundle found in {})",
                SYSTEM_BUNDLES.join(", ")
            );
        }
        let mut text = self.sources.join(" and ");
        if !self.platform_found {
            text.push_str(&format!(
                " only (no system CA bundle found in {})",
                SYSTEM_BUNDLES.join(", ")
            ));
        }
        text
    }

    /// Bundles and directories that were named but could not be used, one sentence each.
    pub(super) fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The roots for ureq: the certificates read, or ureq's built-in Mozilla roots when
    /// none was found.
    pub(super) fn root_certs(&self) -> ureq::tls::RootCerts {
        if self.certs.is_empty() {
            return ureq::tls::RootCerts::WebPki;
        }
        self.certs
            .iter()
            .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
            .into()
    }
}

fn set_var(env: &impl Fn(&str) -> Option<OsString>, name: &str) -> Option<OsString> {
    env(name).filter(|v| !v.is_empty())
}

fn plural(count: usize) -> String {
    if count == 1 {
        "1 certificate".to_string()
    } else {
        format!("{count} certificates")
    }
}

/// How many of `certs` rustls accepts as trust roots.
fn usable(certs: &[CertificateDer<'static>]) -> usize {
    let mut store = rustls::RootCertStore::empty();
    store.add_parsable_certificates(certs.iter().cloned()).0
}

/// A named bundle: a PEM file, or a directory of them (as requests and OpenSSL allow).
fn read_bundle(path: &Path) -> Result<(Vec<CertificateDer<'static>>, Option<String>), String> {
    if path.is_dir() {
        read_pem_dir(path).map(|certs| (certs, None))
    } else {
        read_pem_file(path)
    }
}

/// The certificates of a PEM file, and a sentence when a malformed block stopped the
/// reading (the certificates before it are kept).
fn read_pem_file(path: &Path) -> Result<(Vec<CertificateDer<'static>>, Option<String>), String> {
    let size = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    if size > MAX_BUNDLE {
        return Err(format!(
            "{size} bytes, more than the {MAX_BUNDLE} a certificate bundle may have"
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let mut certs = Vec::new();
    for item in CertificateDer::pem_slice_iter(&bytes) {
        match item {
            Ok(cert) => certs.push(cert),
            Err(e) => {
                let problem = format!(
                    "is not valid PEM after {}: {}",
                    plural(certs.len()),
                    pem_problem(&e)
                );
                return Ok((certs, Some(problem)));
            }
        }
    }
    Ok((certs, None))
}

/// A PEM syntax error in words (rustls prints the marker as a list of bytes).
fn pem_problem(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::MissingSectionEnd { end_marker } => format!(
            "a block has no \"-----END {}-----\" line",
            String::from_utf8_lossy(end_marker).trim()
        ),
        Error::IllegalSectionStart { line } => format!(
            "the line \"{}\" does not start a block",
            String::from_utf8_lossy(line).trim()
        ),
        other => other.to_string(),
    }
}

/// The certificates of every readable PEM file directly in `dir`, in name order (files
/// that are not PEM, such as the hash links' targets read twice, add nothing new).
fn read_pem_dir(dir: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    let mut certs = Vec::new();
    for path in paths {
        if let Ok((found, _)) = read_pem_file(&path) {
            certs.extend(found);
        }
    }
    Ok(certs)
}

/// The rustls error behind a ureq failure, if the failure is one.
pub(super) fn rustls_error(e: &ureq::Error) -> Option<&TlsError> {
    match e {
        ureq::Error::Rustls(inner) => Some(inner),
        ureq::Error::Io(io) => io.get_ref()?.downcast_ref::<TlsError>(),
        _ => None,
    }
}

/// Whether a TLS failure can only happen during the handshake, before any of the request
/// went out (so repeating it cannot duplicate anything).
pub(super) fn before_request(err: &TlsError) -> bool {
    matches!(
        err,
        TlsError::InvalidCertificate(_)
            | TlsError::NoCertificatesPresented
            | TlsError::UnsupportedNameType
            | TlsError::PeerIncompatible(_)
            | TlsError::InvalidCertRevocationList(_)
            | TlsError::InvalidMessage(InvalidMessage::InvalidContentType)
    )
}

/// One sentence for a TLS failure talking to `url` (no credentials in it); `trusted` says
/// what the agent trusts, for an unknown issuer.
pub(super) fn describe(err: &TlsError, url: &str, trusted: &str) -> String {
    let TlsError::InvalidCertificate(cert) = err else {
        return match err {
            TlsError::NoCertificatesPresented => {
                format!("TLS: {url} presented no certificate")
            }
            TlsError::InvalidMessage(InvalidMessage::InvalidContentType) => format!(
                "TLS: {url} did not answer in TLS ({err}); if the server speaks plain HTTP, \
                 server_address must start with http://"
            ),
            TlsError::PeerIncompatible(_) => format!(
                "TLS: {url} and the agent have no TLS version or cipher suite in common ({err})"
            ),
            TlsError::AlertReceived(alert) => {
                format!("TLS: {url} ended the connection with the alert {alert:?}")
            }
            _ => format!("TLS: the connection to {url} failed: {err}"),
        };
    };
    match cert {
        CertificateError::UnknownIssuer => format!(
            "TLS: the certificate of {url} has an unknown issuer, no CA the agent trusts \
             (trusted: {trusted}); for a lab's own CA, name its PEM file in \
             REQUESTS_CA_BUNDLE or SSL_CERT_FILE in the agent's environment, or install it \
             with update-ca-certificates"
        ),
        CertificateError::Expired => format!(
            "TLS: the certificate of {url} has expired; renew it on the server (or check \
             this machine's clock)"
        ),
        CertificateError::ExpiredContext { time, not_after } => format!(
            "TLS: the certificate of {url} has expired: valid until {}, and this machine's \
             clock says {}; renew it on the server (or check the clock)",
            utc(not_after.as_secs()),
            utc(time.as_secs())
        ),
        CertificateError::NotValidYet => {
            format!("TLS: the certificate of {url} is not valid yet; check this machine's clock")
        }
        CertificateError::NotValidYetContext { time, not_before } => format!(
            "TLS: the certificate of {url} is not valid yet: valid from {}, and this \
             machine's clock says {}; check the clock",
            utc(not_before.as_secs()),
            utc(time.as_secs())
        ),
        CertificateError::NotValidForName => format!(
            "TLS: the certificate of {url} is for another name (name mismatch); use a name \
             the certificate has in server_address, or have it reissued for this one"
        ),
        CertificateError::NotValidForNameContext {
            expected,
            presented,
        } => {
            let names: Vec<String> = presented.iter().map(|n| presented_name(n)).collect();
            let has = if names.is_empty() {
                "it names no host (no subjectAltName)".to_string()
            } else {
                format!("it is for {}", names.join(", "))
            };
            format!(
                "TLS: the certificate of {url} is not valid for {} (name mismatch): {has}; use \
                 one of those names in server_address, or have the certificate reissued for it",
                expected.to_str()
            )
        }
        CertificateError::Revoked => format!("TLS: the certificate of {url} has been revoked"),
        _ => format!("TLS: the certificate of {url} was refused: {err}"),
    }
}

/// `DnsName("a.example")` or `IpAddress(10.0.0.1)`, as rustls reports a certificate's
/// names, as `a.example` or `10.0.0.1`.
fn presented_name(name: &str) -> String {
    let inner = name
        .strip_prefix("DnsName(\"")
        .and_then(|n| n.strip_suffix("\")"))
        .or_else(|| {
            name.strip_prefix("IpAddress(")
                .and_then(|n| n.strip_suffix(')'))
        });
    inner.unwrap_or(name).to_string()
}

/// Seconds since the epoch as `2026-01-05 10:00:00 UTC`.
fn utc(secs: u64) -> String {
    let iso = crate::time::iso_at(UNIX_EPOCH + Duration::from_secs(secs));
    match iso.get(..19) {
        Some(stamp) => format!("{} UTC", stamp.replacen('T', " ", 1)),
        None => iso,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{ServerName, UnixTime};

    const URL: &str = "https://tf.lab:8443";

    #[test]
    fn unknown_issuer_names_the_server_and_the_fix() {
        let err = TlsError::InvalidCertificate(CertificateError::UnknownIssuer);
        let text = describe(
            &err,
            URL,
            "/etc/ssl/certs/ca-certificates.crt (3 certificates)",
        );
        assert!(
            text.starts_with("TLS: the certificate of https://tf.lab:8443 has an unknown issuer")
        );
        for needle in [
            "REQUESTS_CA_BUNDLE",
            "SSL_CERT_FILE",
            "update-ca-certificates",
            "trusted: /etc/ssl/certs/ca-certificates.crt (3 certificates)",
        ] {
            assert!(text.contains(needle), "{needle} in {text}");
        }
        assert!(before_request(&err));
    }

    #[test]
    fn expiry_and_validity_dates_are_readable() {
        let expired = TlsError::InvalidCertificate(CertificateError::ExpiredContext {
            time: UnixTime::since_unix_epoch(Duration::from_secs(1_767_225_600)),
            not_after: UnixTime::since_unix_epoch(Duration::from_secs(1_767_139_200)),
        });
        let text = describe(&expired, URL, "");
        assert!(
            text.contains("has expired: valid until 2025-12-31 00:00:00 UTC"),
            "{text}"
        );
        assert!(
            text.contains("clock says 2026-01-01 00:00:00 UTC"),
            "{text}"
        );
        let early = TlsError::InvalidCertificate(CertificateError::NotValidYetContext {
            time: UnixTime::since_unix_epoch(Duration::from_secs(0)),
            not_before: UnixTime::since_unix_epoch(Duration::from_secs(86_400)),
        });
        let text = describe(&early, URL, "");
        assert!(
            text.contains("not valid yet: valid from 1970-01-02 00:00:00 UTC"),
            "{text}"
        );
        let plain = describe(
            &TlsError::InvalidCertificate(CertificateError::Expired),
            URL,
            "",
        );
        assert!(plain.contains(&format!("{URL} has expired")), "{plain}");
    }

    #[test]
    fn name_mismatch_says_which_names_the_certificate_has() {
        let err = TlsError::InvalidCertificate(CertificateError::NotValidForNameContext {
            expected: ServerName::try_from("127.0.0.1").expect("an address"),
            presented: vec![
                "DnsName(\"example.invalid\")".to_string(),
                "IpAddress(10.0.0.1)".to_string(),
                "DirectoryName".to_string(),
            ],
        });
        let text = describe(&err, URL, "");
        assert!(
            text.contains(
                "is not valid for 127.0.0.1 (name mismatch): it is for example.invalid, \
                 10.0.0.1, DirectoryName"
            ),
            "{text}"
        );
        let none = TlsError::InvalidCertificate(CertificateError::NotValidForNameContext {
            expected: ServerName::try_from("tf.lab").expect("a name"),
            presented: vec![],
        });
        assert!(describe(&none, URL, "").contains("it names no host"));
    }

    #[test]
    fn other_failures_still_name_the_server() {
        let plain_http = TlsError::InvalidMessage(InvalidMessage::InvalidContentType);
        let text = describe(&plain_http, URL, "");
        assert!(
            text.contains("must start with http://") && text.contains(URL),
            "{text}"
        );
        assert!(before_request(&plain_http));
        let revoked = TlsError::InvalidCertificate(CertificateError::BadSignature);
        let text = describe(&revoked, URL, "");
        assert!(text.starts_with(&format!("TLS: the certificate of {URL} was refused: ")));
        // A failure that may come after the request went out is not "not sent".
        assert!(!before_request(&TlsError::DecryptError));
        assert!(describe(&TlsError::DecryptError, URL, "").contains(URL));
    }

    #[test]
    fn the_rustls_error_is_found_inside_a_ureq_error() {
        let inner = TlsError::InvalidCertificate(CertificateError::UnknownIssuer);
        let io = ureq::Error::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            inner.clone(),
        ));
        assert_eq!(rustls_error(&io), Some(&inner));
        assert_eq!(
            rustls_error(&ureq::Error::Rustls(inner.clone())),
            Some(&inner)
        );
        assert_eq!(rustls_error(&ureq::Error::ConnectionFailed), None);
        let other_io = ureq::Error::Io(std::io::Error::other("reset"));
        assert_eq!(rustls_error(&other_io), None);
    }

    /// A PEM block whose content is not a certificate rustls can use as a root.
    const NOT_A_ROOT: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";

    #[test]
    fn an_unusable_bundle_gives_one_warning_naming_variable_and_path() {
        let tmp = crate::testing::tempdir("tls-bad");
        let dir = tmp.path().to_path_buf();
        let missing = dir.join("missing.pem");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").expect("write");
        let bogus = dir.join("bogus.pem");
        std::fs::write(&bogus, NOT_A_ROOT).expect("write");
        let env = |name: &str| match name {
            "REQUESTS_CA_BUNDLE" => Some(missing.clone().into_os_string()),
            "CURL_CA_BUNDLE" => Some(bogus.clone().into_os_string()),
            "SSL_CERT_FILE" => Some(empty.clone().into_os_string()),
            _ => None,
        };
        let trust = Trust::load_from(env, &[]);
        let warnings = trust.warnings();
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(warnings[0].starts_with(&format!("REQUESTS_CA_BUNDLE={}: ", missing.display())));
        assert!(warnings[0].contains("cannot be read"), "{}", warnings[0]);
        assert!(warnings[1].starts_with(&format!("CURL_CA_BUNDLE={}: ", bogus.display())));
        assert!(
            warnings[1].contains("no certificate usable"),
            "{}",
            warnings[1]
        );
        assert!(warnings[2].starts_with(&format!("SSL_CERT_FILE={}: ", empty.display())));
        assert!(
            warnings[2].contains("holds no PEM certificate"),
            "{}",
            warnings[2]
        );
        for w in warnings {
            assert!(w.ends_with("trusting Mozilla's roots built into the agent (no system CA bundle found) without it"), "{w}");
        }
        assert!(matches!(trust.root_certs(), ureq::tls::RootCerts::WebPki));
    }

    /// A self-signed CA certificate in PEM.
    fn ca_pem(name: &str) -> String {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().expect("a key");
        params.self_signed(&key).expect("a CA").pem()
    }

    #[test]
    fn the_system_store_and_the_named_bundles_add_up() {
        let tmp = crate::testing::tempdir("tls-union");
        let dir = tmp.path().to_path_buf();
        let (a, b, c) = (ca_pem("A"), ca_pem("B"), ca_pem("C"));
        let system = dir.join("system.crt");
        std::fs::write(&system, format!("# system\n{a}")).expect("write");
        // The lab's bundle repeats A: it is trusted once.
        let lab = dir.join("lab.pem");
        std::fs::write(&lab, format!("{b}{a}")).expect("write");
        let cert_dir = dir.join("certs");
        std::fs::create_dir_all(&cert_dir).expect("dir");
        std::fs::write(cert_dir.join("c.pem"), &c).expect("write");
        std::fs::write(cert_dir.join("README"), "not a certificate").expect("write");
        let system_path = system.to_str().expect("utf-8 temp path").to_string();
        let env = |name: &str| match name {
            "REQUESTS_CA_BUNDLE" | "SSL_CERT_FILE" => Some(lab.clone().into_os_string()),
            "SSL_CERT_DIR" => Some(cert_dir.clone().into_os_string()),
            _ => None,
        };
        let trust = Trust::load_from(env, &["/nonexistent/first.crt", &system_path]);
        assert!(trust.warnings().is_empty(), "{:?}", trust.warnings());
        assert_eq!(trust.certs.len(), 3, "A, C and B, each once");
        assert_eq!(
            trust.summary(),
            format!(
                "{} (1 certificate) and SSL_CERT_DIR directory {} (1 certificate) and \
                 REQUESTS_CA_BUNDLE={} (2 certificates)",
                system.display(),
                cert_dir.display(),
                lab.display()
            )
        );
        match trust.root_certs() {
            ureq::tls::RootCerts::Specific(certs) => assert_eq!(certs.len(), 3),
            _ => panic!("the certificates read are the roots"),
        }
        // Without a system bundle, the lab's bundle alone (ureq cannot add it to its
        // built-in roots), and the summary says so.
        let alone = Trust::load_from(
            |name| (name == "REQUESTS_CA_BUNDLE").then(|| lab.clone().into_os_string()),
            &[],
        );
        assert_eq!(alone.certs.len(), 2);
        assert!(alone
            .summary()
            .contains(" only (no system CA bundle found in"));
        // A broken bundle next to a good system store: the warning says what is used.
        let broken = dir.join("broken.pem");
        std::fs::write(&broken, format!("{b}-----BEGIN CERTIFICATE-----\nAAAA\n")).expect("write");
        let partial = Trust::load_from(
            |name| (name == "SSL_CERT_FILE").then(|| broken.clone().into_os_string()),
            &[&system_path],
        );
        assert_eq!(partial.certs.len(), 2);
        assert_eq!(partial.warnings().len(), 1);
        let warning = &partial.warnings()[0];
        assert!(
            warning.starts_with(&format!("SSL_CERT_FILE={}: ", broken.display())),
            "{warning}"
        );
        assert!(
            warning.contains(
                "is not valid PEM after 1 certificate: a block has no \
                 \"-----END CERTIFICATE-----\" line; what comes after it is not read \
                 (1 certificate trusted from this bundle)"
            ),
            "{warning}"
        );
    }

    #[test]
    fn unset_and_empty_variables_are_ignored() {
        let trust = Trust::load_from(
            |name| (name == "SSL_CERT_FILE").then(OsString::new),
            &["/nonexistent/bundle.crt"],
        );
        assert!(trust.warnings().is_empty());
        assert!(trust
            .summary()
            .starts_with("Mozilla's roots built into the agent"));
    }
}
