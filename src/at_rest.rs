//! Encryption at rest for what the node writes to disk (`store.encryption_key_file`):
//! the embedded store's `presence.redb` and the sinks' `sinks.redb`.
//!
//! - **Values** are sealed with XChaCha20-Poly1305 (RustCrypto), a random 24-byte nonce
//!   each, bound (as associated data) to their table and key: a record moved to another
//!   key or table does not open.
//! - **Keys** that name someone (user ids, conversation ids) are blinded: stored as a
//!   keyed hash (HMAC-SHA256), and the real key travels inside the sealed value. So not
//!   even who has a record can be read from the file.
//! - **The master key** (32 bytes: a file of 32 raw bytes or of 64 hex digits, or
//!   `store.encryption_key` in hex) is not used directly: an encryption key and a
//!   blinding key are derived from it.
//! - Each database carries a **check value** in its `presenced.meta` table: sealed with
//!   the key it was written with, it tells a wrong key (or a missing one) at open, before
//!   anything is read or written.
//! - [`rewrite`] copies a database into a fresh file and renames it over the old one:
//!   used to encrypt a plain database (its old pages, plain text included, go with the
//!   old file) and to change the key (`presenced rekey`).

use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use rand::RngCore;
use redb::{Database, ReadableDatabase, TableDefinition};
use sha2::Sha256;

/// The table that says how a database is sealed.
pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new(META_NAME);
const META_NAME: &str = "presenced.meta";
/// In [`META`]: the check value (see the module documentation).
const CHECK_KEY: &str = "key_check";
const CHECK_PLAIN: &[u8] = b"presenced at-rest v1";
/// The first byte of a sealed value: the format.
const VERSION: u8 = 1;
const NONCE: usize = 24;

/// A key that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{source_name}: cannot read {}: {reason}", path.display())]
    Read { source_name: &'static str, path: PathBuf, reason: String },
    #[error("{source_name}: must hold 32 bytes (32 raw bytes, or 64 hex digits: `openssl rand -hex 32`); found {found}")]
    Format { source_name: &'static str, found: String },
}

/// The derived keys of one master key.
pub struct Sealer {
    cipher: XChaCha20Poly1305,
    blind: Hmac<Sha256>,
    /// Eight hex digits naming the key in logs (a hash, not the key).
    pub fingerprint: String,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealer({})", self.fingerprint)
    }
}

/// HMAC-SHA256 keyed with `key` (zero-padded to the block, as HMAC pads a short key).
fn hmac(key: &[u8; 32]) -> Hmac<Sha256> {
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(key);
    <Hmac<Sha256> as hmac::digest::KeyInit>::new(&block.into())
}

fn derive(master: &[u8; 32], purpose: &[u8]) -> [u8; 32] {
    let mut mac = hmac(master);
    mac.update(purpose);
    mac.finalize().into_bytes().into()
}

impl Sealer {
    pub fn new(master: &[u8; 32]) -> Sealer {
        let enc = derive(master, b"presenced/at-rest/encrypt/v1");
        let blind = derive(master, b"presenced/at-rest/blind/v1");
        let print = derive(master, b"presenced/at-rest/fingerprint/v1");
        Sealer { cipher: XChaCha20Poly1305::new(&enc.into()), blind: hmac(&blind), fingerprint: hex(&print[..4]) }
    }

    /// A key from its text (64 hex digits) or raw bytes (exactly 32). `source_name` says
    /// where it came from, in errors.
    pub fn parse(bytes: &[u8], source_name: &'static str) -> Result<Sealer, KeyError> {
        if let Ok(raw) = <[u8; 32]>::try_from(bytes) {
            // 32 bytes that are also hex text would be 16-byte keys in hex: refuse them.
            if !raw.iter().all(u8::is_ascii_hexdigit) {
                return Ok(Sealer::new(&raw));
            }
        }
        match std::str::from_utf8(bytes) {
            Ok(text) => Sealer::parse_hex(text, source_name),
            Err(_) => Err(KeyError::Format { source_name, found: format!("{} bytes", bytes.len()) }),
        }
    }

    /// A key written as 64 hex digits (surrounding white space ignored).
    pub fn parse_hex(text: &str, source_name: &'static str) -> Result<Sealer, KeyError> {
        let text = text.trim();
        let found = format!("{} characters", text.len());
        if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(KeyError::Format { source_name, found });
        }
        let mut raw = [0u8; 32];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| KeyError::Format { source_name, found: found.clone() })?;
        }
        Ok(Sealer::new(&raw))
    }

    /// The key `store` names, if any.
    pub fn of(store: &crate::config::StoreConfig) -> Result<Option<std::sync::Arc<Sealer>>, KeyError> {
        let sealer = match (&store.encryption_key_file, store.encryption_key.as_str()) {
            (Some(path), _) => Sealer::from_file(path)?,
            (None, "") => return Ok(None),
            (None, hex) => Sealer::parse_hex(hex, "store.encryption_key")?,
        };
        Ok(Some(std::sync::Arc::new(sealer)))
    }

    /// Reads a key file (see [`Sealer::parse`]).
    pub fn from_file(path: &Path) -> Result<Sealer, KeyError> {
        let source_name = "store.encryption_key_file";
        let bytes = std::fs::read(path).map_err(|e| KeyError::Read { source_name, path: path.to_path_buf(), reason: e.to_string() })?;
        Sealer::parse(&bytes, source_name)
    }

    /// `value` sealed for `(table, key)`: `[version][nonce][ciphertext and tag]`.
    pub fn seal(&self, table: &str, key: &[u8], value: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE];
        rand::rng().fill_bytes(&mut nonce);
        let aad = aad(table, key);
        // Encryption fails only for messages over 256 GiB.
        let sealed = self.cipher.encrypt(&XNonce::from(nonce), Payload { msg: value, aad: &aad }).unwrap_or_default();
        let mut out = Vec::with_capacity(1 + NONCE + sealed.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// The value sealed for `(table, key)`, or `None` when it does not open (another key,
    /// another place, damage).
    pub fn open(&self, table: &str, key: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.first() != Some(&VERSION) || sealed.len() < 1 + NONCE {
            return None;
        }
        let aad = aad(table, key);
        let nonce: [u8; NONCE] = sealed[1..1 + NONCE].try_into().ok()?;
        self.cipher.decrypt(&XNonce::from(nonce), Payload { msg: &sealed[1 + NONCE..], aad: &aad }).ok()
    }

    /// The stored name of `key` in `table`: 32 hex digits of a keyed hash.
    pub fn blind(&self, table: &str, key: &str) -> String {
        let mut mac = self.blind.clone();
        mac.update(table.as_bytes());
        mac.update(&[0]);
        mac.update(key.as_bytes());
        hex(&mac.finalize().into_bytes()[..16])
    }

    /// Seals a record whose key is blinded: the real key goes inside.
    pub fn seal_named(&self, table: &str, key: &str, value: &[u8]) -> (String, Vec<u8>) {
        let stored = self.blind(table, key);
        let mut plain = Vec::with_capacity(2 + key.len() + value.len());
        plain.extend_from_slice(&(key.len().min(u16::MAX as usize) as u16).to_le_bytes());
        plain.extend_from_slice(key.as_bytes());
        plain.extend_from_slice(value);
        let sealed = self.seal(table, stored.as_bytes(), &plain);
        (stored, sealed)
    }

    /// The real key and the value of a record sealed by [`Sealer::seal_named`].
    pub fn open_named(&self, table: &str, stored: &str, sealed: &[u8]) -> Option<(String, Vec<u8>)> {
        let plain = self.open(table, stored.as_bytes(), sealed)?;
        let n = u16::from_le_bytes(plain.get(..2)?.try_into().ok()?) as usize;
        let key = std::str::from_utf8(plain.get(2..2 + n)?).ok()?.to_string();
        Some((key, plain.get(2 + n..)?.to_vec()))
    }
}

fn aad(table: &str, key: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(table.len() + 1 + key.len());
    aad.extend_from_slice(table.as_bytes());
    aad.push(0);
    aad.extend_from_slice(key);
    aad
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How an opened database is sealed, against the key given.
#[derive(Debug, PartialEq, Eq)]
pub enum Sealing {
    /// Not sealed (or empty), and no key given.
    Plain,
    /// Sealed with the key given.
    Sealed,
    /// Not sealed, and a key given: to be encrypted ([`rewrite`]).
    ToSeal,
    /// Sealed, and no key given.
    KeyMissing,
    /// Sealed with another key than the one given.
    WrongKey,
}

/// Reads the check value of `db` against `sealer`.
pub fn sealing(db: &Database, sealer: Option<&Sealer>) -> Result<Sealing, String> {
    let rtx = db.begin_read().map_err(|e| e.to_string())?;
    let check = match rtx.open_table(META) {
        Ok(t) => t.get(CHECK_KEY).map_err(|e| e.to_string())?.map(|v| v.value().to_vec()),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(e.to_string()),
    };
    Ok(match (check, sealer) {
        (None, None) => Sealing::Plain,
        (None, Some(_)) => Sealing::ToSeal,
        (Some(_), None) => Sealing::KeyMissing,
        (Some(c), Some(s)) => match s.open(META_NAME, CHECK_KEY.as_bytes(), &c) {
            Some(p) if p == CHECK_PLAIN => Sealing::Sealed,
            _ => Sealing::WrongKey,
        },
    })
}

/// Writes the check value of `sealer` (or removes it: plain) in `tx`.
pub fn mark(tx: &redb::WriteTransaction, sealer: Option<&Sealer>) -> Result<(), redb::Error> {
    let mut t = tx.open_table(META)?;
    match sealer {
        Some(s) => {
            t.insert(CHECK_KEY, s.seal(META_NAME, CHECK_KEY.as_bytes(), CHECK_PLAIN).as_slice())?;
        }
        None => {
            t.remove(CHECK_KEY)?;
        }
    }
    Ok(())
}

/// Copies the database at `path` into a fresh file with `copy(old, new)`, then puts the
/// new file in its place (fsync'd, renamed, the directory fsync'd). The old file, and
/// every page it ever held, is gone. The caller must not hold `path` open.
pub fn rewrite(path: &Path, copy: impl FnOnce(&Database, &Database) -> Result<(), String>) -> Result<(), String> {
    let fresh = path.with_extension("redb.rewrite");
    match std::fs::remove_file(&fresh) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot remove the leftover {}: {e}", fresh.display())),
    }
    // The old file stays open (locked) until the new one replaced it: no node can start
    // on it meanwhile.
    let old = Database::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let done = (|| {
        {
            let new = Database::create(&fresh).map_err(|e| format!("{}: {e}", fresh.display()))?;
            copy(&old, &new)?;
        }
        std::fs::File::open(&fresh).and_then(|f| f.sync_all()).map_err(|e| format!("{}: {e}", fresh.display()))?;
        std::fs::rename(&fresh, path).map_err(|e| format!("cannot replace {}: {e}", path.display()))
    })();
    drop(old);
    if let Err(e) = done {
        // A half-written copy may hold the data in another form (plain, after --decrypt).
        let _ = std::fs::remove_file(&fresh);
        return Err(e);
    }
    if let Some(dir) = path.parent() {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_place() {
        let a = Sealer::new(&[7u8; 32]);
        let b = Sealer::new(&[8u8; 32]);
        let sealed = a.seal("users", b"alice", b"on a flight");
        assert!(!sealed.windows(6).any(|w| w == b"flight"), "no plain text in the sealed value");
        assert_eq!(a.open("users", b"alice", &sealed).as_deref(), Some(&b"on a flight"[..]));
        assert_eq!(b.open("users", b"alice", &sealed), None, "another key");
        assert_eq!(a.open("users", b"bob", &sealed), None, "another key name");
        assert_eq!(a.open("contacts", b"alice", &sealed), None, "another table");
        assert_ne!(a.seal("users", b"alice", b"x"), a.seal("users", b"alice", b"x"), "a fresh nonce each time");

        let (stored, value) = a.seal_named("contacts", "alice", b"[\"bob\"]");
        assert!(!stored.contains("alice") && stored.len() == 32);
        assert_eq!(stored, a.blind("contacts", "alice"), "the stored name is stable (deletes find it)");
        assert_ne!(stored, b.blind("contacts", "alice"));
        assert_eq!(a.open_named("contacts", &stored, &value), Some(("alice".into(), b"[\"bob\"]".to_vec())));
    }

    #[test]
    fn keys_are_32_bytes_raw_or_in_hex() {
        let hex64 = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n";
        let from_hex = Sealer::parse(hex64.as_bytes(), "test").unwrap();
        let raw: Vec<u8> = (0..32).map(|i| if i % 2 == 0 { (i / 2 * 0x11) as u8 } else { 0 }).collect();
        let _ = Sealer::parse(&raw, "test").unwrap();
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex64[2 * i..2 * i + 2], 16).unwrap();
        }
        assert_eq!(from_hex.fingerprint, Sealer::new(&bytes).fingerprint, "hex and raw give the same key");
        // The text setting takes hex only: a 32-character passphrase is not a key.
        assert!(matches!(Sealer::parse_hex(&"p4ssphrase-".repeat(3)[..32], "test"), Err(KeyError::Format { .. })));
        assert_eq!(Sealer::parse_hex(hex64, "test").unwrap().fingerprint, from_hex.fingerprint);
        for bad in [&b"short"[..], &[1u8; 31], &[1u8; 33], "zz".repeat(32).as_bytes(), "ab".repeat(16).as_bytes()] {
            assert!(matches!(Sealer::parse(bad, "test"), Err(KeyError::Format { .. })), "{bad:?}");
        }
    }
}
