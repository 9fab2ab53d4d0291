//! JWT authentication (seed 003 §7): HS256 with `auth.jwt_secret`, and RS256/ES256 with a
//! configured public key. `iss` and `exp` are always checked; unsigned (`alg: none`) tokens
//! and algorithms other than the configured ones are refused.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{AuthConfig, MIN_SECRET_BYTES};

/// The scope that lets a backend act for any user (contacts, sessions, conversations).
pub const ADMIN_SCOPE: &str = "presence:admin";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub iss: String,
    /// Space-separated scopes (RFC 8693 style), e.g. `presence:admin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

/// Who is calling, once a token checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub sub: String,
    pub scopes: Vec<String>,
    /// Where the call came from (the audit log says it).
    pub origin: Origin,
}

/// The transport and peer of a call, and whether its identity is the gateway's word
/// (`X-User-ID` in `auth.mode: gateway`) rather than a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// `http`, `ws`, `grpc`, or `internal` (no transport: the node itself, a test).
    pub transport: &'static str,
    pub peer: Option<std::net::SocketAddr>,
    pub gateway: bool,
}

impl Default for Origin {
    fn default() -> Self {
        Origin { transport: "internal", peer: None, gateway: false }
    }
}

impl Identity {
    /// A user's identity with no transport yet (see [`Identity::via`]).
    pub fn user(sub: impl Into<String>) -> Identity {
        Identity { sub: sub.into(), scopes: Vec::new(), origin: Origin::default() }
    }

    /// The same identity, calling over `transport` from `peer`.
    pub fn via(mut self, transport: &'static str, peer: Option<std::net::SocketAddr>) -> Identity {
        self.origin.transport = transport;
        self.origin.peer = peer;
        self
    }

    pub fn is_admin(&self) -> bool {
        self.scopes.iter().any(|s| s == ADMIN_SCOPE)
    }

    /// May this caller write `user_id`'s own data?
    pub fn may_act_for(&self, user_id: &str) -> bool {
        self.sub == user_id || self.is_admin()
    }
}

/// Why a token was refused; every variant is a 401 with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token (send 'Authorization: Bearer <JWT>')")]
    Missing,
    #[error("authorization header must be 'Bearer <JWT>'")]
    BadScheme,
    #[error("token is malformed")]
    Malformed,
    #[error("unsigned tokens (alg none) are not accepted")]
    Unsigned,
    #[error("token algorithm {0} is not accepted here")]
    Algorithm(String),
    #[error("token signature is invalid")]
    Signature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token issuer is not accepted")]
    Issuer,
    #[error("token lacks the required claim {0:?}")]
    MissingClaim(String),
    #[error("missing X-User-ID header (auth.mode is gateway: the API gateway must set it)")]
    MissingGatewayUser,
    #[error(
        "missing bearer token: X-User-ID is only trusted when the server runs with auth.mode: gateway \
         (PRESENCE_AUTH__MODE=gateway, behind a gateway that authenticates users); this one wants \
         'Authorization: Bearer <JWT>' (or ?token= on /ws)"
    )]
    GatewayHeaderIgnored,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("auth: cannot read or create the JWT secret file {path}: {source}")]
    SecretFile { path: std::path::PathBuf, source: std::io::Error },
    #[error("auth: cannot read auth.public_key_file {path}: {source}")]
    KeyFile { path: std::path::PathBuf, source: std::io::Error },
    #[error("auth.public_key: not a PEM RSA or EC (P-256) public key")]
    BadKey,
    #[error(
        "auth: the JWT secret in {path} is shorter than {min} bytes (empty or damaged?): refusing to sign or accept tokens with it. \
         Put a secret of at least {min} bytes there (`openssl rand -hex 32`), or delete the file to have a new one made \
         (tokens issued with the old secret stop working)",
        min = MIN_SECRET_BYTES
    )]
    WeakSecretFile { path: std::path::PathBuf },
}

/// Verifies tokens and mints development tokens.
pub struct Authenticator {
    issuer: String,
    leeway: u64,
    hs_decode: DecodingKey,
    hs_encode: EncodingKey,
    public: Option<(Algorithm, DecodingKey)>,
}

impl Authenticator {
    /// Builds from config. With no `jwt_secret`, a random secret is kept in
    /// `data_dir/jwt.secret` (created mode 0600) so `serve` and `token` agree.
    pub fn from_config(cfg: &AuthConfig, data_dir: &Path) -> Result<Authenticator, AuthSetupError> {
        let secret = if cfg.jwt_secret.is_empty() { load_or_create_secret(data_dir)? } else { cfg.jwt_secret.clone() };
        let pem = match &cfg.public_key_file {
            Some(path) => Some(std::fs::read(path).map_err(|source| AuthSetupError::KeyFile { path: path.clone(), source })?),
            None if !cfg.public_key.is_empty() => Some(cfg.public_key.clone().into_bytes()),
            None => None,
        };
        let public = match pem {
            None => None,
            Some(pem) => Some(if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                (Algorithm::RS256, k)
            } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
                (Algorithm::ES256, k)
            } else {
                return Err(AuthSetupError::BadKey);
            }),
        };
        Ok(Authenticator::new(&secret, &cfg.jwt_issuer, cfg.leeway.0, public))
    }

    pub fn new(secret: &str, issuer: &str, leeway: Duration, public: Option<(Algorithm, DecodingKey)>) -> Authenticator {
        Authenticator {
            issuer: issuer.to_string(),
            leeway: leeway.as_secs(),
            hs_decode: DecodingKey::from_secret(secret.as_bytes()),
            hs_encode: EncodingKey::from_secret(secret.as_bytes()),
            public,
        }
    }

    /// Checks an `Authorization` header value.
    pub fn verify_header(&self, header: Option<&str>) -> Result<Identity, AuthError> {
        let h = header.ok_or(AuthError::Missing)?.trim();
        let (scheme, token) = h.split_once(' ').ok_or(AuthError::BadScheme)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::BadScheme);
        }
        self.verify(token.trim())
    }

    /// Checks a bare token.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let header = match jsonwebtoken::decode_header(token) {
            Ok(h) => h,
            Err(_) if header_alg(token).is_some_and(|a| a.eq_ignore_ascii_case("none")) => return Err(AuthError::Unsigned),
            Err(_) => {
                return Err(match header_alg(token) {
                    Some(a) => AuthError::Algorithm(a),
                    None => AuthError::Malformed,
                })
            }
        };
        let key = match (&header.alg, &self.public) {
            (Algorithm::HS256, _) => &self.hs_decode,
            (alg, Some((want, key))) if alg == want => key,
            (alg, _) => return Err(AuthError::Algorithm(format!("{alg:?}"))),
        };
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[&self.issuer]);
        v.set_required_spec_claims(&["exp", "sub", "iss"]);
        v.leeway = self.leeway;
        v.validate_nbf = true;
        let data = jsonwebtoken::decode::<Claims>(token, key, &v).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidIssuer => AuthError::Issuer,
            ErrorKind::InvalidSignature => AuthError::Signature,
            ErrorKind::InvalidAlgorithm => AuthError::Algorithm(format!("{:?}", header.alg)),
            ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(c.clone()),
            _ => AuthError::Malformed,
        })?;
        let c = data.claims;
        if c.sub.is_empty() {
            return Err(AuthError::MissingClaim("sub".into()));
        }
        // RFC 6749 §3.3: scopes are separated by U+0020 only (so "a\u{a0}presence:admin" is
        // one unknown scope, not the admin scope).
        let scopes = c.scope.unwrap_or_default().split(' ').filter(|s| !s.is_empty()).map(str::to_string).collect();
        Ok(Identity { sub: c.sub, scopes, origin: Origin::default() })
    }

    /// Mints an HS256 token for `sub`, valid for `ttl`, with optional space-separated scopes.
    pub fn mint(&self, sub: &str, ttl: Duration, scope: Option<&str>) -> Result<String, String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let claims = Claims {
            sub: sub.to_string(),
            iat: Some(now),
            exp: now.saturating_add(ttl.as_secs()),
            iss: self.issuer.clone(),
            scope: scope.filter(|s| !s.is_empty()).map(str::to_string),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.hs_encode).map_err(|e| e.to_string())
    }
}

/// The `alg` of a token's header, read without trusting anything else in it.
fn header_alg(token: &str) -> Option<String> {
    let first = token.split('.').next()?;
    let bytes = base64url_decode(first)?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("alg")?.as_str().map(str::to_string)
}

fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            b'=' => continue,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// Reads `data_dir/jwt.secret`, or creates it with a random 256-bit secret: written to
/// a temporary file (mode 0600), synced, then linked into place only if no other process
/// made one meanwhile (so two processes never end up with different secrets), and the
/// directory synced. A file holding fewer than [`MIN_SECRET_BYTES`] is refused.
fn load_or_create_secret(data_dir: &Path) -> Result<String, AuthSetupError> {
    use std::io::Write;
    let path = data_dir.join("jwt.secret");
    let err = |source| AuthSetupError::SecretFile { path: path.clone(), source };
    let checked = |s: String| {
        let s = s.trim().to_string();
        if s.len() < MIN_SECRET_BYTES {
            Err(AuthSetupError::WeakSecretFile { path: path.clone() })
        } else {
            Ok(s)
        }
    };
    match std::fs::read_to_string(&path) {
        Ok(s) => return checked(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => return Err(AuthSetupError::WeakSecretFile { path: path.clone() }),
        Err(e) => return Err(err(e)),
    }
    std::fs::create_dir_all(data_dir).map_err(err)?;
    let secret: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
    let tmp = data_dir.join(format!(".jwt.secret.{}.{:08x}", std::process::id(), rand::random::<u32>()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let written = (|| {
        let mut f = opts.open(&tmp)?;
        f.write_all(secret.as_bytes())?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            if let Ok(dir) = std::fs::File::open(data_dir) {
                let _ = dir.sync_all();
            }
            tracing::info!(path = %path.display(), "created a random JWT secret (set auth.jwt_secret to choose one)");
            Ok(secret)
        }
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => checked(std::fs::read_to_string(&path).map_err(err)?),
        Err(e) => Err(err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Authenticator {
        Authenticator::new("secret", "presence-service", Duration::ZERO, None)
    }

    fn b64(s: &str) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let b = s.as_bytes();
        let mut out = String::new();
        for chunk in b.chunks(3) {
            let n = chunk.iter().enumerate().fold(0u32, |a, (i, &x)| a | (u32::from(x) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    #[test]
    fn minted_tokens_verify_with_scopes() {
        let a = auth();
        let t = a.mint("alice", Duration::from_secs(60), Some("presence:admin other")).unwrap();
        let id = a.verify_header(Some(&format!("Bearer {t}"))).unwrap();
        assert_eq!(id.sub, "alice");
        assert!(id.is_admin());
        assert!(id.may_act_for("bob"));
        let t = a.mint("bob", Duration::from_secs(60), None).unwrap();
        let id = a.verify(&t).unwrap();
        assert!(!id.is_admin() && id.may_act_for("bob") && !id.may_act_for("alice"));
    }

    #[test]
    fn refusals_say_why() {
        let a = auth();
        assert_eq!(a.verify_header(None), Err(AuthError::Missing));
        assert_eq!(a.verify_header(Some("Basic abc")), Err(AuthError::BadScheme));
        assert_eq!(a.verify_header(Some("Bearer ")), Err(AuthError::BadScheme));
        assert_eq!(a.verify("not.a.jwt"), Err(AuthError::Malformed));
        let other = Authenticator::new("other", "presence-service", Duration::ZERO, None);
        assert_eq!(a.verify(&other.mint("x", Duration::from_secs(60), None).unwrap()), Err(AuthError::Signature));
        let wrong_iss = Authenticator::new("secret", "someone-else", Duration::ZERO, None);
        assert_eq!(a.verify(&wrong_iss.mint("x", Duration::from_secs(60), None).unwrap()), Err(AuthError::Issuer));
        // Expired: exp in the past.
        let claims = Claims { sub: "x".into(), exp: 1_000, iat: None, iss: "presence-service".into(), scope: None };
        let t = jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(b"secret")).unwrap();
        assert_eq!(a.verify(&t), Err(AuthError::Expired));
        // alg none.
        let none = format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT"}"#), b64(r#"{"sub":"x","exp":9999999999,"iss":"presence-service"}"#));
        assert_eq!(a.verify(&none), Err(AuthError::Unsigned));
        // RS256 header with no public key configured.
        let rs = format!("{}.{}.sig", b64(r#"{"alg":"RS256"}"#), b64(r#"{"sub":"x"}"#));
        assert_eq!(a.verify(&rs), Err(AuthError::Algorithm("RS256".into())));
    }

    #[test]
    fn scopes_split_on_spaces_only() {
        let a = auth();
        for (scope, admin) in [
            ("presence:admin", true),
            ("read presence:admin", true),
            ("  presence:admin  ", true),
            ("foo\u{a0}presence:admin", false),
            ("foo\tpresence:admin", false),
            ("foo\npresence:admin", false),
            ("presence:admin\u{3000}", false),
        ] {
            let t = a.mint("x", Duration::from_secs(60), Some(scope)).unwrap();
            assert_eq!(a.verify(&t).unwrap().is_admin(), admin, "{scope:?}");
        }
    }

    #[test]
    fn a_short_or_empty_secret_file_is_refused() {
        for content in ["", "   \n", "abc", &"x".repeat(31)] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("jwt.secret"), content).unwrap();
            let e = load_or_create_secret(dir.path()).expect_err("refused");
            assert!(matches!(e, AuthSetupError::WeakSecretFile { .. }), "{content:?}: {e}");
            assert!(e.to_string().contains("jwt.secret"), "{e}");
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("jwt.secret"), "y".repeat(32)).unwrap();
        assert_eq!(load_or_create_secret(dir.path()).unwrap(), "y".repeat(32));
    }

    #[test]
    fn concurrent_creators_agree_and_leave_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let secrets: Vec<String> = (0..8)
            .map(|_| {
                let p = path.clone();
                std::thread::spawn(move || load_or_create_secret(&p).unwrap())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        assert!(secrets.windows(2).all(|w| w[0] == w[1]), "{secrets:?}");
        let names: Vec<String> = std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names, vec!["jwt.secret".to_string()]);
    }

    #[test]
    fn secret_file_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let s1 = load_or_create_secret(dir.path()).unwrap();
        let s2 = load_or_create_secret(dir.path()).unwrap();
        assert_eq!(s1, s2);
        assert_eq!(s1.len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("jwt.secret")).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
