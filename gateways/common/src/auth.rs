//! Users and their credentials, shared by every gateway that authenticates.
//!
//! Passwords are never stored: each user has salted SCRAM credentials (RFC 5802/7677), written
//! as `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64 parts, the format
//! PostgreSQL uses). The same credential checks a plain password (SASL PLAIN, MQTT and AMQP
//! passwords) by deriving the StoredKey again, and drives a SCRAM exchange without ever
//! knowing the password. `tributary passwd` prints credentials for a password.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256, Sha512};

/// Iterations for new credentials (Kafka's default for SCRAM is 4096; more costs each login).
pub const DEFAULT_ITERATIONS: u32 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScramHash {
    Sha256,
    Sha512,
}

impl ScramHash {
    pub fn mechanism(self) -> &'static str {
        match self {
            Self::Sha256 => "SCRAM-SHA-256",
            Self::Sha512 => "SCRAM-SHA-512",
        }
    }

    pub fn from_mechanism(m: &str) -> Option<Self> {
        match m {
            "SCRAM-SHA-256" => Some(Self::Sha256),
            "SCRAM-SHA-512" => Some(Self::Sha512),
            _ => None,
        }
    }

    pub fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        match self {
            Self::Sha256 => {
                let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
            Self::Sha512 => {
                let mut m = Hmac::<Sha512>::new_from_slice(key).expect("HMAC takes any key length");
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
        }
    }

    pub fn hash(self, data: &[u8]) -> Vec<u8> {
        match self {
            Self::Sha256 => Sha256::digest(data).to_vec(),
            Self::Sha512 => Sha512::digest(data).to_vec(),
        }
    }

    /// PBKDF2 of the password: the client's SaltedPassword.
    pub fn salted_password(self, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
        match self {
            Self::Sha256 => {
                let mut out = [0u8; 32];
                pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out);
                out.to_vec()
            }
            Self::Sha512 => {
                let mut out = [0u8; 64];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, iterations, &mut out);
                out.to_vec()
            }
        }
    }
}

/// One stored SCRAM credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScramCredential {
    pub hash: ScramHash,
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid credential '{text}': {why} (expected SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>, as printed by `tributary passwd`)"
)]
pub struct CredentialError {
    text: String,
    why: String,
}

impl ScramCredential {
    /// Derives a credential from a password with a fresh random salt.
    pub fn derive(hash: ScramHash, password: &str, iterations: u32) -> Self {
        let salt: [u8; 16] = rand::random();
        Self::derive_with_salt(hash, password, &salt, iterations)
    }

    pub fn derive_with_salt(hash: ScramHash, password: &str, salt: &[u8], iterations: u32) -> Self {
        let salted = hash.salted_password(password.as_bytes(), salt, iterations);
        Self::from_salted_password(hash, &salted, salt, iterations)
    }

    /// From the SaltedPassword a client computed (Kafka's AlterUserScramCredentials sends it
    /// instead of the password).
    pub fn from_salted_password(
        hash: ScramHash,
        salted: &[u8],
        salt: &[u8],
        iterations: u32,
    ) -> Self {
        let client_key = hash.hmac(salted, b"Client Key");
        Self {
            hash,
            iterations,
            salt: salt.to_vec(),
            stored_key: hash.hash(&client_key),
            server_key: hash.hmac(salted, b"Server Key"),
        }
    }

    /// Whether `password` is the one this credential was derived from.
    pub fn verify_password(&self, password: &str) -> bool {
        let again = Self::derive_with_salt(self.hash, password, &self.salt, self.iterations);
        constant_time_eq(&again.stored_key, &self.stored_key)
    }

    pub fn parse(text: &str) -> Result<Self, CredentialError> {
        let err = |why: &str| CredentialError {
            text: text.chars().take(40).collect(),
            why: why.into(),
        };
        let mut parts = text.split('$');
        let (Some(mech), Some(params), Some(keys), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(err("wrong number of '$'-separated parts"));
        };
        let hash = ScramHash::from_mechanism(mech).ok_or_else(|| err("unknown mechanism"))?;
        let (iter, salt) = params
            .split_once(':')
            .ok_or_else(|| err("no ':' in parameters"))?;
        let (stored, server) = keys.split_once(':').ok_or_else(|| err("no ':' in keys"))?;
        let iterations: u32 = iter
            .parse()
            .map_err(|_| err("iterations is not a number"))?;
        if iterations < 4096 {
            return Err(err("iterations must be at least 4096"));
        }
        let b64 = |v: &str| B64.decode(v).map_err(|_| err("bad base64"));
        Ok(Self {
            hash,
            iterations,
            salt: b64(salt)?,
            stored_key: b64(stored)?,
            server_key: b64(server)?,
        })
    }

    pub fn to_text(&self) -> String {
        format!(
            "{}${}:{}${}:{}",
            self.hash.mechanism(),
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(&self.stored_key),
            B64.encode(&self.server_key)
        )
    }
}

/// Compares without an early exit, so timing does not tell how much matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A password hash imported from RabbitMQ (`rabbit_password_hashing_sha256` / `_sha512`):
/// base64 of a 4-byte salt followed by hash(salt ++ password). It checks plain-password
/// logins (AMQP PLAIN, MQTT, Kafka SASL/PLAIN), so users keep their passwords across a
/// migration; SCRAM needs a SCRAM credential (`tributary passwd`), which cannot be derived
/// from this hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordHash {
    pub sha512: bool,
    pub salt: [u8; 4],
    pub hash: Vec<u8>,
}

impl PasswordHash {
    /// The config-file prefixes of the two algorithms.
    pub const SHA256_PREFIX: &'static str = "RABBITMQ-SHA-256$";
    pub const SHA512_PREFIX: &'static str = "RABBITMQ-SHA-512$";

    /// From RabbitMQ's `password_hash` (base64) and `hashing_algorithm`.
    pub fn from_rabbitmq(password_hash: &str, algorithm: &str) -> Result<Self, String> {
        let sha512 = match algorithm {
            "rabbit_password_hashing_sha256" | "" => false,
            "rabbit_password_hashing_sha512" => true,
            other => {
                return Err(format!(
                    "hashing algorithm {other} is not supported (sha256 and sha512 are)"
                ));
            }
        };
        let raw = B64
            .decode(password_hash)
            .map_err(|_| "password_hash is not base64".to_string())?;
        let want = if sha512 { 64 } else { 32 };
        if raw.len() != 4 + want {
            return Err(format!(
                "password_hash has {} bytes, expected a 4-byte salt and a {want}-byte hash",
                raw.len()
            ));
        }
        Ok(Self {
            sha512,
            salt: raw[..4].try_into().expect("4 bytes"),
            hash: raw[4..].to_vec(),
        })
    }

    /// From its config-file text (`RABBITMQ-SHA-256$<base64>`), `None` if it is not one.
    pub fn parse(text: &str) -> Option<Result<Self, String>> {
        let (algorithm, b64) = if let Some(b) = text.strip_prefix(Self::SHA256_PREFIX) {
            ("rabbit_password_hashing_sha256", b)
        } else if let Some(b) = text.strip_prefix(Self::SHA512_PREFIX) {
            ("rabbit_password_hashing_sha512", b)
        } else {
            return None;
        };
        Some(Self::from_rabbitmq(b64, algorithm))
    }

    /// RabbitMQ's `password_hash` (base64 of salt and hash) and `hashing_algorithm`, as
    /// its definitions hold them.
    pub fn to_rabbitmq(&self) -> (String, &'static str) {
        let mut raw = self.salt.to_vec();
        raw.extend_from_slice(&self.hash);
        let algorithm = if self.sha512 {
            "rabbit_password_hashing_sha512"
        } else {
            "rabbit_password_hashing_sha256"
        };
        (B64.encode(raw), algorithm)
    }

    pub fn to_text(&self) -> String {
        let mut raw = self.salt.to_vec();
        raw.extend_from_slice(&self.hash);
        let prefix = if self.sha512 {
            Self::SHA512_PREFIX
        } else {
            Self::SHA256_PREFIX
        };
        format!("{prefix}{}", B64.encode(raw))
    }

    pub fn verify_password(&self, password: &str) -> bool {
        use sha2::Digest;
        let computed = if self.sha512 {
            let mut h = sha2::Sha512::new();
            h.update(self.salt);
            h.update(password.as_bytes());
            h.finalize().to_vec()
        } else {
            let mut h = sha2::Sha256::new();
            h.update(self.salt);
            h.update(password.as_bytes());
            h.finalize().to_vec()
        };
        constant_time_eq(&computed, &self.hash)
    }
}

/// The configured users.
#[derive(Debug, Clone, Default)]
pub struct Users {
    users: HashMap<String, Vec<ScramCredential>>,
    /// Imported password hashes, checked for plain-password logins.
    hashes: HashMap<String, PasswordHash>,
    /// Namespaces (AMQP vhosts) granted with the user itself (users kept in the core).
    namespaces: HashMap<String, Vec<String>>,
}

impl Users {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, name: &str, credentials: Vec<ScramCredential>) {
        self.users.insert(name.to_string(), credentials);
    }

    /// Adds (or replaces) a user's imported password hash.
    pub fn add_password_hash(&mut self, name: &str, hash: PasswordHash) {
        self.users.entry(name.to_string()).or_default();
        self.hashes.insert(name.to_string(), hash);
    }

    /// Adds (or replaces) a user from credential texts: SCRAM credentials (`tributary
    /// passwd`) and RabbitMQ password hashes (`tributary import rabbitmq`; plain-password
    /// logins only).
    pub fn add_credential_texts(&mut self, name: &str, texts: &[String]) -> Result<(), String> {
        let mut creds = Vec::new();
        let mut hash = None;
        for c in texts {
            match PasswordHash::parse(c) {
                Some(parsed) => hash = Some(parsed?),
                None => creds.push(ScramCredential::parse(c).map_err(|e| e.to_string())?),
            }
        }
        self.add(name, creds);
        match hash {
            Some(hash) => self.add_password_hash(name, hash),
            None => {
                self.hashes.remove(name);
            }
        }
        Ok(())
    }

    /// Grants `user` these namespaces (AMQP vhosts) besides what the config file grants.
    pub fn grant_namespaces(&mut self, user: &str, namespaces: Vec<String>) {
        self.namespaces.insert(user.to_string(), namespaces);
    }

    /// Whether `user` was granted `namespace` with the user itself.
    pub fn granted(&self, user: &str, namespace: &str) -> bool {
        self.namespaces
            .get(user)
            .is_some_and(|ns| ns.iter().any(|n| n == namespace))
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Whether `user` is configured (with SCRAM credentials, an imported hash, or both).
    pub fn contains(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// The user names, sorted (for listings: never the credentials).
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.users.keys().cloned().collect();
        names.sort();
        names
    }

    /// A user's imported RabbitMQ password hash (what `tributary export rabbitmq` can give
    /// back to RabbitMQ; a SCRAM credential cannot be turned into one).
    pub fn password_hash(&self, user: &str) -> Option<&PasswordHash> {
        self.hashes.get(user)
    }

    pub fn credential(&self, user: &str, hash: ScramHash) -> Option<&ScramCredential> {
        self.users.get(user)?.iter().find(|c| c.hash == hash)
    }

    /// Checks a user name and plain password against any of the user's credentials.
    pub fn verify_password(&self, user: &str, password: &str) -> bool {
        self.users
            .get(user)
            .and_then(|creds| creds.first())
            .is_some_and(|c| c.verify_password(password))
            || self
                .hashes
                .get(user)
                .is_some_and(|h| h.verify_password(password))
    }
}

// ---------------------------------------------------------------------------------------
// Rate limit of refusal log lines (core token, admin API, Kafka ACLs)
// ---------------------------------------------------------------------------------------

/// At most one refusal log line per peer (and listener) in this long; the refusals in
/// between are counted and the count is given with the next line.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Peers remembered by the rate limiter; beyond it, new peers share one slot (so a flood
/// from many addresses still logs a bounded number of lines and uses bounded memory).
pub const MAX_TRACKED_PEERS: usize = 4096;

/// Per-peer state of the rate limiter.
struct PeerState {
    logged_at: Instant,
    suppressed: u64,
}

/// Rate limiter for refusal log lines: one line per peer per interval.
pub struct RefusalLimiter {
    interval: Duration,
    capacity: usize,
    peers: std::sync::Mutex<HashMap<Option<IpAddr>, PeerState>>,
}

impl RefusalLimiter {
    pub fn new(interval: Duration, capacity: usize) -> Self {
        Self {
            interval,
            capacity,
            peers: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Peers remembered now (bounded by the capacity plus the shared slot).
    pub fn tracked(&self) -> usize {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Notes one refusal from `peer` at `now`. `Some(n)`: log a line now, `n` refusals from
    /// this peer went unlogged since its last line. `None`: stay quiet (counted for later).
    pub fn admit(&self, peer: Option<IpAddr>, now: Instant) -> Option<u64> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let mut key = peer;
        if !peers.contains_key(&key) && peers.len() >= self.capacity {
            let interval = self.interval;
            peers.retain(|_, s| now.duration_since(s.logged_at) < interval);
            if peers.len() >= self.capacity {
                // Full of peers seen in this interval: newcomers share the `None` slot.
                key = None;
            }
        }
        match peers.get_mut(&key) {
            Some(s) if now.duration_since(s.logged_at) < self.interval => {
                s.suppressed += 1;
                None
            }
            Some(s) => {
                let suppressed = std::mem::take(&mut s.suppressed);
                s.logged_at = now;
                Some(suppressed)
            }
            None => {
                peers.insert(
                    key,
                    PeerState {
                        logged_at: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

/// Protocol logins refused (a wrong password, an unknown user, an anonymous client where
/// none is allowed, a vhost the user may not open): each counted in
/// `tributary_auth_refusals_total{listener,reason}` and logged at WARN with the peer, the
/// user and the reason, at most once per peer address per [`REFUSAL_LOG_INTERVAL`] (the
/// line says how many it stood for). One per gateway.
pub struct LoginRefusals {
    limiter: RefusalLimiter,
}

impl Default for LoginRefusals {
    fn default() -> Self {
        Self {
            limiter: RefusalLimiter::new(REFUSAL_LOG_INTERVAL, MAX_TRACKED_PEERS),
        }
    }
}

impl std::fmt::Debug for LoginRefusals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginRefusals").finish_non_exhaustive()
    }
}

impl LoginRefusals {
    /// Counts and (rate-limited) logs one refused login. `reason` is a short label
    /// (`bad_credentials`, `anonymous`, `mechanism`, `guest_remote`, `vhost`); `detail` is
    /// what the client was told.
    pub fn refused(
        &self,
        listener: &'static str,
        peer: std::net::SocketAddr,
        user: &str,
        reason: &'static str,
        detail: &str,
    ) {
        metrics::counter!(
            "tributary_auth_refusals_total",
            "listener" => listener,
            "reason" => reason
        )
        .increment(1);
        if let Some(suppressed) = self.limiter.admit(Some(peer.ip()), Instant::now()) {
            // The name is the client's to choose (MQTT allows 64 KiB): cut for the log.
            let user: String = user.chars().take(128).collect();
            tracing::warn!(
                listener,
                %peer,
                user,
                reason,
                detail,
                suppressed_since_last_line = suppressed,
                "login refused (at most one line per peer every {} s; every refusal is counted in tributary_auth_refusals_total)",
                REFUSAL_LOG_INTERVAL.as_secs()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rabbitmq_password_hashes_check_plain_passwords() {
        // RabbitMQ's scheme: base64(salt ++ sha256(salt ++ password)), salt 4 bytes.
        use sha2::Digest;
        let salt = [1u8, 2, 3, 4];
        let mut h = sha2::Sha256::new();
        h.update(salt);
        h.update(b"guest2");
        let mut raw = salt.to_vec();
        raw.extend_from_slice(&h.finalize());
        let text = B64.encode(&raw);
        let hash = PasswordHash::from_rabbitmq(&text, "rabbit_password_hashing_sha256").unwrap();
        assert!(hash.verify_password("guest2"));
        assert!(!hash.verify_password("guest"));
        assert_eq!(PasswordHash::parse(&hash.to_text()).unwrap().unwrap(), hash);
        assert!(PasswordHash::from_rabbitmq(&text, "rabbit_password_hashing_md5").is_err());
        assert!(PasswordHash::from_rabbitmq("AAAA", "").is_err());
        let mut users = Users::new();
        users.add_password_hash("u", hash);
        assert!(users.verify_password("u", "guest2"));
        assert!(!users.verify_password("u", "nope"));
        assert!(users.credential("u", ScramHash::Sha256).is_none());
    }

    #[test]
    fn credentials_round_trip_and_check_passwords() {
        let c = ScramCredential::derive(ScramHash::Sha256, "s3cret", 4096);
        let parsed = ScramCredential::parse(&c.to_text()).unwrap();
        assert_eq!(parsed, c);
        assert!(parsed.verify_password("s3cret"));
        assert!(!parsed.verify_password("s3cret "));
        assert!(ScramCredential::parse("SCRAM-SHA-1$4096:AA==$AA==:AA==").is_err());
        assert!(ScramCredential::parse("SCRAM-SHA-256$10:AA==$AA==:AA==").is_err());
        assert!(ScramCredential::parse("plain").is_err());
    }

    #[test]
    fn rfc7677_test_vector() {
        // RFC 7677 section 3: user "user", password "pencil", 4096 iterations.
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let c = ScramCredential::derive_with_salt(ScramHash::Sha256, "pencil", &salt, 4096);
        let salted = ScramHash::Sha256.salted_password(b"pencil", &salt, 4096);
        let server_key = ScramHash::Sha256.hmac(&salted, b"Server Key");
        assert_eq!(c.server_key, server_key);
        let auth_message = "n=user,r=rOprNGfwEbeRWgbNEkqO,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let server_signature = ScramHash::Sha256.hmac(&c.server_key, auth_message.as_bytes());
        assert_eq!(
            B64.encode(server_signature),
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
    }
}
