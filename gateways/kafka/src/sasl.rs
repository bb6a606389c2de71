//! SASL for Kafka clients: PLAIN (RFC 4616) and SCRAM-SHA-256/512 (RFC 5802, 7677) against
//! the configured users. Written here because no maintained crate offers a SCRAM *server*
//! over stored keys; the primitives (HMAC, PBKDF2, SHA-2) are RustCrypto's.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use tributary_gateway_common::auth::constant_time_eq;
pub use tributary_gateway_common::auth::{ScramCredential, ScramHash, Users as SaslUsers};

/// Mechanisms offered, in the order the handshake lists them.
pub const MECHANISMS: &[&str] = &["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];

/// One authentication exchange on one connection.
pub struct Conversation {
    users: Arc<SaslUsers>,
    state: State,
}

enum State {
    Plain,
    ScramFirst(ScramHash),
    ScramFinal {
        hash: ScramHash,
        user: String,
        credential: ScramCredential,
        nonce: String,
        client_first_bare: String,
        server_first: String,
    },
    Finished,
}

/// The outcome of one client message.
pub enum Step {
    Continue(Bytes),
    Done { reply: Bytes, user: String },
    Failed(String),
}

impl Conversation {
    /// `None` when the mechanism is not offered.
    pub fn start(mechanism: &str, users: Arc<SaslUsers>) -> Option<Self> {
        let state = match mechanism {
            "PLAIN" => State::Plain,
            m => State::ScramFirst(ScramHash::from_mechanism(m)?),
        };
        Some(Self { users, state })
    }

    pub fn step(&mut self, message: &[u8]) -> Step {
        match std::mem::replace(&mut self.state, State::Finished) {
            State::Plain => self.plain(message),
            State::ScramFirst(hash) => self.scram_first(hash, message),
            State::ScramFinal {
                hash,
                user,
                credential,
                nonce,
                client_first_bare,
                server_first,
            } => scram_final(
                hash,
                &user,
                &credential,
                &nonce,
                &client_first_bare,
                &server_first,
                message,
            ),
            State::Finished => Step::Failed("the exchange is already over".into()),
        }
    }

    fn plain(&self, message: &[u8]) -> Step {
        // authzid NUL authcid NUL passwd
        let mut parts = message.split(|b| *b == 0);
        let (Some(authzid), Some(user), Some(password), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Step::Failed("malformed PLAIN message".into());
        };
        let (Ok(authzid), Ok(user), Ok(password)) = (
            std::str::from_utf8(authzid),
            std::str::from_utf8(user),
            std::str::from_utf8(password),
        ) else {
            return Step::Failed("PLAIN message is not UTF-8".into());
        };
        if !authzid.is_empty() && authzid != user {
            return Step::Failed(format!("user '{user}' may not act as '{authzid}'"));
        }
        if self.users.verify_password(user, password) {
            Step::Done {
                reply: Bytes::new(),
                user: user.to_string(),
            }
        } else {
            Step::Failed(format!("wrong user name or password for '{user}'"))
        }
    }

    fn scram_first(&mut self, hash: ScramHash, message: &[u8]) -> Step {
        let Ok(text) = std::str::from_utf8(message) else {
            return Step::Failed("SCRAM message is not UTF-8".into());
        };
        // gs2-header: "n,," or "y,," (no channel binding), optionally with "a=authzid".
        let mut it = text.splitn(3, ',');
        let (Some(cb), Some(authzid), Some(bare)) = (it.next(), it.next(), it.next()) else {
            return Step::Failed("malformed SCRAM client-first message".into());
        };
        if cb != "n" && cb != "y" {
            return Step::Failed("channel binding is not supported".into());
        }
        let mut user = None;
        let mut client_nonce = None;
        for attr in bare.split(',') {
            if let Some(v) = attr.strip_prefix("n=") {
                user = Some(v.replace("=2C", ",").replace("=3D", "="));
            } else if let Some(v) = attr.strip_prefix("r=") {
                client_nonce = Some(v.to_string());
            } else if attr.starts_with("m=") {
                return Step::Failed("SCRAM mandatory extensions are not supported".into());
            }
            // Other attributes (Kafka's tokenauth extension) are ignored.
        }
        let (Some(user), Some(client_nonce)) = (user, client_nonce) else {
            return Step::Failed("SCRAM client-first message lacks n= or r=".into());
        };
        if let Some(a) = authzid.strip_prefix("a=")
            && a != user
        {
            return Step::Failed(format!("user '{user}' may not act as '{a}'"));
        }
        let Some(credential) = self.users.credential(&user, hash).cloned() else {
            return Step::Failed(format!("no {} credential for '{user}'", hash.mechanism()));
        };
        let server_nonce: [u8; 18] = rand::random();
        let nonce = format!("{client_nonce}{}", B64.encode(server_nonce));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&credential.salt),
            credential.iterations
        );
        let reply = Bytes::from(server_first.clone());
        self.state = State::ScramFinal {
            hash,
            user,
            credential,
            nonce,
            client_first_bare: bare.to_string(),
            server_first,
        };
        Step::Continue(reply)
    }
}

fn scram_final(
    hash: ScramHash,
    user: &str,
    credential: &ScramCredential,
    nonce: &str,
    client_first_bare: &str,
    server_first: &str,
    message: &[u8],
) -> Step {
    let Ok(text) = std::str::from_utf8(message) else {
        return Step::Failed("SCRAM message is not UTF-8".into());
    };
    let Some((without_proof, proof)) = text.rsplit_once(",p=") else {
        return Step::Failed("SCRAM client-final message lacks a proof".into());
    };
    let mut got_nonce = None;
    for attr in without_proof.split(',') {
        if let Some(v) = attr.strip_prefix("r=") {
            got_nonce = Some(v);
        }
    }
    if got_nonce != Some(nonce) {
        return Step::Failed("SCRAM nonce mismatch".into());
    }
    let Ok(proof) = B64.decode(proof) else {
        return Step::Failed("SCRAM proof is not base64".into());
    };
    let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
    let client_signature = hash.hmac(&credential.stored_key, auth_message.as_bytes());
    if proof.len() != client_signature.len() {
        return Step::Failed(format!("wrong password for '{user}'"));
    }
    let client_key: Vec<u8> = proof
        .iter()
        .zip(&client_signature)
        .map(|(a, b)| a ^ b)
        .collect();
    if !constant_time_eq(&hash.hash(&client_key), &credential.stored_key) {
        return Step::Failed(format!("wrong password for '{user}'"));
    }
    let server_signature = hash.hmac(&credential.server_key, auth_message.as_bytes());
    Step::Done {
        reply: Bytes::from(format!("v={}", B64.encode(server_signature))),
        user: user.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users() -> Arc<SaslUsers> {
        let mut u = SaslUsers::new();
        u.add(
            "alice",
            vec![
                ScramCredential::derive(ScramHash::Sha256, "pw", 4096),
                ScramCredential::derive(ScramHash::Sha512, "pw", 4096),
            ],
        );
        Arc::new(u)
    }

    #[test]
    fn plain_accepts_the_password_only() {
        let mut c = Conversation::start("PLAIN", users()).unwrap();
        assert!(matches!(c.step(b"\0alice\0pw"), Step::Done { .. }));
        let mut c = Conversation::start("PLAIN", users()).unwrap();
        assert!(matches!(c.step(b"\0alice\0nope"), Step::Failed(_)));
        let mut c = Conversation::start("PLAIN", users()).unwrap();
        assert!(matches!(c.step(b"garbage"), Step::Failed(_)));
        assert!(Conversation::start("GSSAPI", users()).is_none());
    }

    /// A full SCRAM exchange computed the client's way.
    fn client_exchange(hash: ScramHash, password: &str) -> Step {
        let mut c = Conversation::start(hash.mechanism(), users()).unwrap();
        let first_bare = "n=alice,r=clientnonce";
        let Step::Continue(server_first) = c.step(format!("n,,{first_bare}").as_bytes()) else {
            panic!("expected a server-first message");
        };
        let server_first = String::from_utf8(server_first.to_vec()).unwrap();
        let mut nonce = "";
        let mut salt = Vec::new();
        let mut iterations = 0;
        for a in server_first.split(',') {
            if let Some(v) = a.strip_prefix("r=") {
                nonce = v;
            } else if let Some(v) = a.strip_prefix("s=") {
                salt = B64.decode(v).unwrap();
            } else if let Some(v) = a.strip_prefix("i=") {
                iterations = v.parse().unwrap();
            }
        }
        assert!(nonce.starts_with("clientnonce"));
        let cred = ScramCredential::derive_with_salt(hash, password, &salt, iterations);
        let without_proof = format!("c=biws,r={nonce}");
        let auth = format!("{first_bare},{server_first},{without_proof}");
        let sig = hash.hmac(&cred.stored_key, auth.as_bytes());
        let salted = hash.salted_password(password.as_bytes(), &salt, iterations);
        let client_key = hash.hmac(&salted, b"Client Key");
        let proof: Vec<u8> = client_key.iter().zip(&sig).map(|(a, b)| a ^ b).collect();
        c.step(format!("{without_proof},p={}", B64.encode(proof)).as_bytes())
    }

    #[test]
    fn scram_exchanges_succeed_with_the_password_and_fail_without() {
        for hash in [ScramHash::Sha256, ScramHash::Sha512] {
            assert!(matches!(client_exchange(hash, "pw"), Step::Done { .. }));
            assert!(matches!(client_exchange(hash, "wrong"), Step::Failed(_)));
        }
    }
}
