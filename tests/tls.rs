//! Encrypted database connections: a throwaway PostgreSQL with `ssl = on` and a server
//! certificate from a CA made here. vigil's own settings (`DB_SSLMODE=verify-full`,
//! `DB_SSLROOTCERT`) connect to it, and refuse a server whose certificate does not
//! match.

mod common;

use std::path::Path;
use std::time::Duration;

use common::OwnPostgres;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use vigil::config::{Environment, Settings};
use vigil::store::{Store, Target};

/// A CA, and a server certificate it signed for `names`.
fn ca_and_server(names: &[&str]) -> (String, String, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "vigil test CA");
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut server =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    server.distinguished_name.push(DnType::CommonName, names[0]);
    let server = server.signed_by(&key, &ca, &ca_key).unwrap();
    (ca.pem(), server.pem(), key.serialize_pem())
}

/// Writes `text` as `name` in `dir`, owned by `owner` (the server's account) with `mode`.
fn put(dir: &Path, name: &str, text: &str, owner: Option<&nix::unistd::User>, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    if let Some(u) = owner {
        nix::unistd::chown(&path, Some(u.uid), Some(u.gid)).unwrap();
    }
}

/// Turns TLS on in `pg`'s cluster with this certificate, and restarts it.
async fn with_tls(pg: &mut OwnPostgres, server_pem: &str, key_pem: &str) {
    pg.down().await;
    let pgdata = pg.data_dir().join("postgres");
    // The server's files belong to the account it runs as (`postgres` when root).
    let owner = if nix::unistd::geteuid().is_root() {
        nix::unistd::User::from_name("postgres")
            .unwrap()
            .or_else(|| nix::unistd::User::from_name("nobody").unwrap())
    } else {
        None
    };
    put(&pgdata, "server.crt", server_pem, owner.as_ref(), 0o644);
    put(&pgdata, "server.key", key_pem, owner.as_ref(), 0o600);
    let conf = pgdata.join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
    std::fs::write(&conf, text).unwrap();
    pg.up().await;
}

fn settings(pg: &OwnPostgres, ca: &Path, host: &str) -> Settings {
    let port = pg.port().to_string();
    let password = pg.password();
    let ca = ca.display().to_string();
    Settings::load(
        &[],
        &Environment::from_pairs([
            ("DB_HOST", host),
            ("DB_PORT", port.as_str()),
            ("DB_USER", "vigil"),
            ("DB_PASSWORD", password.as_str()),
            ("DB_NAME", "vigil"),
            ("DB_SSLMODE", "verify-full"),
            ("DB_SSLROOTCERT", ca.as_str()),
        ]),
    )
    .unwrap()
}

async fn connect(settings: &Settings) -> Result<Store, String> {
    let target =
        Target::from_settings(settings.database.as_ref().unwrap()).map_err(|e| e.to_string())?;
    Store::connect(&target, 1, Duration::from_secs(2))
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_connects_to_the_right_server_and_refuses_any_other() {
    let mut pg = OwnPostgres::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (ca, server, key) = ca_and_server(&["localhost", "127.0.0.1"]);
    with_tls(&mut pg, &server, &key).await;
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();

    // The certificate chains to our CA and names the host: connected, encrypted.
    let store = connect(&settings(&pg, &ca_file, "127.0.0.1"))
        .await
        .unwrap();
    let encrypted: bool =
        sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert!(encrypted);
    store.close().await;

    // Another CA vouches for nothing here.
    let (other_ca, _, _) = ca_and_server(&["localhost"]);
    let other_file = dir.path().join("other-ca.pem");
    std::fs::write(&other_file, &other_ca).unwrap();
    let err = connect(&settings(&pg, &other_file, "127.0.0.1"))
        .await
        .unwrap_err();
    assert!(err.contains("invalid peer certificate"), "{err}");

    // The right CA, but the certificate names other hosts.
    let (ca2, server2, key2) = ca_and_server(&["db.example"]);
    with_tls(&mut pg, &server2, &key2).await;
    std::fs::write(&ca_file, &ca2).unwrap();
    let err = connect(&settings(&pg, &ca_file, "127.0.0.1"))
        .await
        .unwrap_err();
    assert!(err.contains("not valid for name \"127.0.0.1\""), "{err}");
    assert!(
        !err.contains(&pg.password()),
        "no password in the message: {err}"
    );
}

#[test]
fn a_ca_file_that_is_not_there_is_a_located_problem() {
    let err = Settings::load(
        &[],
        &Environment::from_pairs([
            ("DB_HOST", "db"),
            ("DB_SSLMODE", "verify-full"),
            ("DB_SSLROOTCERT", "/nonexistent/ca.pem"),
        ]),
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        "environment variable DB_SSLROOTCERT: db_sslrootcert: /nonexistent/ca.pem is not a readable file (a PEM file of the CA that signed the server's certificate)"
    );
}
