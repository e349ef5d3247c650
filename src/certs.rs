//! `rbdvol tls init`: a CA and server/client certificates for the HTTPS listener, for a
//! test or a small deployment (bring your own PKI for anything larger), plus the
//! `.json` plugin spec dockerd reads.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::error::{Error, Result};

fn cert_err(e: rcgen::Error) -> Error {
    Error::Config(format!("making certificates: {e}"))
}

fn write(dir: &Path, name: &str, body: &str, private: bool) -> Result<()> {
    let path = dir.join(name);
    std::fs::write(&path, body).map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    if private {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(format!("chmod {}", path.display()), e))?;
    }
    Ok(())
}

/// Validity from yesterday (clock skew) to `days` from now.
fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(days);
}

/// A leaf certificate for `names` (DNS names or IP addresses) signed by `issuer`.
pub fn leaf(
    names: &[String],
    usage: ExtendedKeyUsagePurpose,
    days: i64,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<(String, String)> {
    let mut params = CertificateParams::new(names.to_vec()).map_err(cert_err)?;
    params.distinguished_name.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    params.use_authority_key_identifier_extension = true;
    params.key_usages.push(KeyUsagePurpose::DigitalSignature);
    params.extended_key_usages.push(usage);
    validity(&mut params, days);
    let key = KeyPair::generate().map_err(cert_err)?;
    let cert = params.signed_by(&key, issuer).map_err(cert_err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A new CA: its certificate PEM and an issuer to sign leaves with.
pub fn ca(name: &str, days: i64) -> Result<(String, Issuer<'static, KeyPair>, String)> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    validity(&mut params, days);
    let key = KeyPair::generate().map_err(cert_err)?;
    let cert = params.self_signed(&key).map_err(cert_err)?;
    let key_pem = key.serialize_pem();
    Ok((cert.pem(), Issuer::new(params, key), key_pem))
}

/// Writes ca.pem, server.pem/server-key.pem (for `hosts`), client.pem/client-key.pem
/// and rbdvol.json (for /etc/docker/plugins) into `dir`; returns the CA, to sign more.
pub fn init(dir: &Path, hosts: &[String], addr: &str) -> Result<Issuer<'static, KeyPair>> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let (ca_pem, issuer, ca_key) = ca("rbdvol CA", 3650)?;
    write(dir, "ca.pem", &ca_pem, false)?;
    write(dir, "ca-key.pem", &ca_key, true)?;
    let (cert, key) = leaf(hosts, ExtendedKeyUsagePurpose::ServerAuth, 825, &issuer)?;
    write(dir, "server.pem", &cert, false)?;
    write(dir, "server-key.pem", &key, true)?;
    let (cert, key) = leaf(
        &["dockerd".to_string()],
        ExtendedKeyUsagePurpose::ClientAuth,
        825,
        &issuer,
    )?;
    write(dir, "client.pem", &cert, false)?;
    write(dir, "client-key.pem", &key, true)?;
    let abs = |f: &str| dir.join(f).display().to_string();
    let spec = serde_json::json!({
        "Name": "rbdvol",
        "Addr": format!("https://{addr}"),
        "TLSConfig": {
            "InsecureSkipVerify": false,
            "CAFile": abs("ca.pem"),
            "CertFile": abs("client.pem"),
            "KeyFile": abs("client-key.pem"),
        }
    });
    write(
        dir,
        "rbdvol.json",
        &serde_json::to_string_pretty(&spec).unwrap_or_default(),
        false,
    )?;
    Ok(issuer)
}
