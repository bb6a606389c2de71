//! Who the peer of a connection proved to be at the TLS handshake: the subject of its client
//! certificate (verified against `tls_client_ca`), written as RFC 2253 distinguished names are
//! (`CN=alice,OU=eng,O=Acme,C=US`, most specific first), which is the form Kafka's principal
//! builder and its `ssl.principal.mapping.rules` work on.

use tokio::net::TcpStream;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::tls::TlsStream;

/// A stream whose peer may have proved an identity.
pub trait PeerIdentity {
    /// The verified client certificate's subject (RFC 2253), if the peer gave one.
    fn client_certificate_subject(&self) -> Option<String>;
}

impl PeerIdentity for TcpStream {
    fn client_certificate_subject(&self) -> Option<String> {
        None
    }
}

impl<S: PeerIdentity + ?Sized> PeerIdentity for Box<S> {
    fn client_certificate_subject(&self) -> Option<String> {
        (**self).client_certificate_subject()
    }
}

impl PeerIdentity for TlsStream<TcpStream> {
    fn client_certificate_subject(&self) -> Option<String> {
        // rustls only hands out certificates its verifier accepted.
        let leaf = self.get_ref().1.peer_certificates()?.first()?;
        subject_rfc2253(leaf.as_ref())
    }
}

/// The subject of a DER certificate in RFC 2253 form; `None` if it does not parse.
pub fn subject_rfc2253(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let rdns: Vec<String> = cert
        .subject()
        .iter_rdn()
        .map(|rdn| {
            rdn.iter()
                .map(|atv| {
                    let oid = atv.attr_type().to_id_string();
                    let value = match atv.as_str() {
                        Ok(s) => escape(s),
                        // RFC 2253 2.4: a value without a string form is '#' and the hex of
                        // its BER encoding.
                        Err(_) => format!("#{}", hex(atv.attr_value().data)),
                    };
                    format!("{}={value}", short_name(&oid).unwrap_or(&oid))
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    // The certificate lists the RDNs from the root down; RFC 2253 writes them the other way.
    Some(rdns.into_iter().rev().collect::<Vec<_>>().join(","))
}

/// The keywords RFC 2253 (and Java's X500Principal) use; other types are written as OIDs.
fn short_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "STREET",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "0.9.2342.19200300.100.1.25" => "DC",
        "0.9.2342.19200300.100.1.1" => "UID",
        _ => return None,
    })
}

/// RFC 2253 2.4 escaping of an attribute value.
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_escaped_as_rfc_2253_says() {
        assert_eq!(escape("alice"), "alice");
        assert_eq!(escape("Acme, Inc."), "Acme\\, Inc.");
        assert_eq!(escape("#1 "), "\\#1\\ ");
        assert_eq!(escape("a+b=c"), "a\\+b=c");
    }

    #[test]
    fn garbage_is_no_subject() {
        assert_eq!(subject_rfc2253(b"not a certificate"), None);
    }
}
