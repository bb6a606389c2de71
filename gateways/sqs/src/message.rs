//! SQS messages: bodies and message attributes checked as SQS checks them, the MD5 digests
//! the SDKs verify, and how a message is kept in a core record.
//!
//! Message attributes are kept in one record header, `sqs.attributes`, in the very layout
//! SQS digests them in (per attribute, by name: length-prefixed name, data type, a
//! transport byte, length-prefixed value), so a receive digests exactly what was sent.
//! Each attribute is also a plain header of its name, for the other protocols.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use md5::{Digest, Md5};
use serde_json::{Map, Value, json};
use tributary_proto::v1;

use crate::error::{SqsError, SqsResult};

pub const ATTRIBUTES_HEADER: &str = "sqs.attributes";
pub const SYSTEM_ATTRIBUTES_HEADER: &str = "sqs.system-attributes";
/// Message attributes per message, at most.
pub const MAX_ATTRIBUTES: usize = 10;
const MAX_NAME: usize = 256;
const STRING: u8 = 1;
const BINARY: u8 = 2;

/// One message attribute as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribute {
    pub name: String,
    pub data_type: String,
    /// UTF-8 text for String and Number, bytes for Binary.
    pub value: Vec<u8>,
}

impl Attribute {
    fn binary(&self) -> bool {
        self.data_type.starts_with("Binary")
    }
    /// What the attribute counts towards the message size.
    pub fn size(&self) -> usize {
        self.name.len() + self.data_type.len() + self.value.len()
    }
    pub fn to_json(&self) -> Value {
        if self.binary() {
            json!({"DataType": self.data_type, "BinaryValue": BASE64.encode(&self.value)})
        } else {
            json!({"DataType": self.data_type, "StringValue": String::from_utf8_lossy(&self.value)})
        }
    }
}

pub fn md5_hex(bytes: &[u8]) -> String {
    let d = Md5::digest(bytes);
    let mut s = String::with_capacity(32);
    for b in d.iter() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Whether a character may appear in a body or a string attribute: SQS allows #x9, #xA,
/// #xD, #x20 to #xD7FF, #xE000 to #xFFFD and #x10000 to #x10FFFF.
pub fn allowed_char(c: char) -> bool {
    matches!(c, '\u{9}' | '\u{A}' | '\u{D}' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}')
}

pub fn check_text(what: &str, s: &str) -> SqsResult<()> {
    if s.chars().all(allowed_char) {
        Ok(())
    } else {
        Err(SqsError::invalid_message_contents(format!(
            "Invalid characters found in {what}. Valid characters are #x9 | #xA | #xD | #x20 to #xD7FF | #xE000 to #xFFFD | #x10000 to #x10FFFF"
        )))
    }
}

fn check_name(name: &str) -> SqsResult<()> {
    let lower = name.to_ascii_lowercase();
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.contains("..")
        && !lower.starts_with("aws.")
        && !lower.starts_with("amazon.");
    if ok {
        Ok(())
    } else {
        Err(SqsError::invalid_parameter_value(format!(
            "Message attribute name '{name}' is invalid: names are 1 to 256 characters of A-Z, a-z, 0-9, '_', '-' and '.', without '..', not starting or ending with '.', not starting with 'AWS.' or 'Amazon.'"
        )))
    }
}

fn check_type(name: &str, t: &str) -> SqsResult<()> {
    let base = t.split_once('.').map_or(t, |(b, _)| b);
    let custom_ok = t
        .split_once('.')
        .is_none_or(|(_, c)| !c.is_empty() && c.chars().all(|c| c.is_ascii_graphic()));
    if matches!(base, "String" | "Number" | "Binary") && custom_ok && t.len() <= MAX_NAME {
        Ok(())
    } else {
        Err(SqsError::invalid_parameter_value(format!(
            "The message attribute '{name}' has an invalid message attribute type, the set of supported type prefixes is Binary, Number, and String."
        )))
    }
}

/// `MessageAttributes` (or `MessageSystemAttributes`) of a send, checked.
pub fn parse_attributes(what: &str, m: &Map<String, Value>) -> SqsResult<Vec<Attribute>> {
    if m.len() > MAX_ATTRIBUTES {
        return Err(SqsError::invalid_parameter_value(format!(
            "Number of message attributes [{}] exceeds the allowed maximum [{MAX_ATTRIBUTES}].",
            m.len()
        )));
    }
    let mut out = Vec::with_capacity(m.len());
    for (name, v) in m {
        check_name(name)?;
        let Value::Object(v) = v else {
            return Err(SqsError::invalid_parameter_value(format!(
                "The {what} '{name}' must have a value with a DataType."
            )));
        };
        let data_type = match v.get("DataType") {
            Some(Value::String(t)) => t.clone(),
            _ => {
                return Err(SqsError::invalid_parameter_value(format!(
                    "The message attribute '{name}' must contain non-empty message attribute type."
                )));
            }
        };
        check_type(name, &data_type)?;
        let text = v.get("StringValue").and_then(Value::as_str);
        let binary = v.get("BinaryValue").and_then(Value::as_str);
        let value = if data_type.starts_with("Binary") {
            let b = binary.ok_or_else(|| {
                SqsError::invalid_parameter_value(format!(
                    "The message attribute '{name}' with type 'Binary' must use field 'Binary'."
                ))
            })?;
            BASE64.decode(b).map_err(|_| {
                SqsError::invalid_parameter_value(format!(
                    "The message attribute '{name}' has a BinaryValue that is not base64."
                ))
            })?
        } else {
            let s = text.ok_or_else(|| {
                SqsError::invalid_parameter_value(format!(
                    "The message attribute '{name}' with type '{}' must use field 'String'.",
                    if data_type.starts_with("Number") {
                        "Number"
                    } else {
                        "String"
                    }
                ))
            })?;
            check_text(&format!("the message attribute '{name}'"), s)?;
            if data_type.starts_with("Number") && !is_number(s) {
                return Err(SqsError::invalid_parameter_value(format!(
                    "Can't cast the value of message (user) attribute '{name}' to a number."
                )));
            }
            s.as_bytes().to_vec()
        };
        if value.is_empty() {
            return Err(SqsError::invalid_parameter_value(format!(
                "Message (user) attribute '{name}' must contain a non-empty value of type '{data_type}'."
            )));
        }
        out.push(Attribute {
            name: name.clone(),
            data_type,
            value,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// SQS's numbers: an optional sign, digits with an optional fraction, an optional exponent.
fn is_number(s: &str) -> bool {
    let s = s.trim();
    !s.is_empty() && s.parse::<f64>().is_ok_and(f64::is_finite) && !s.contains(['n', 'N', 'i', 'I'])
}

/// The digest layout, which is also how attributes are stored. Sorted by name.
pub fn encode(attrs: &[Attribute]) -> Vec<u8> {
    let mut out = Vec::new();
    for a in attrs {
        for part in [a.name.as_bytes(), a.data_type.as_bytes()] {
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(part);
        }
        out.push(if a.binary() { BINARY } else { STRING });
        out.extend_from_slice(&(a.value.len() as u32).to_be_bytes());
        out.extend_from_slice(&a.value);
    }
    out
}

/// [`encode`] read back; `None` when the bytes are not that layout.
pub fn decode(mut b: &[u8]) -> Option<Vec<Attribute>> {
    fn take<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
        let len = u32::from_be_bytes(b.get(..4)?.try_into().ok()?) as usize;
        let v = b.get(4..4usize.checked_add(len)?)?;
        *b = &b[4 + len..];
        Some(v)
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let name = String::from_utf8(take(&mut b)?.to_vec()).ok()?;
        let data_type = String::from_utf8(take(&mut b)?.to_vec()).ok()?;
        let (_, rest) = b.split_first()?;
        b = rest;
        let value = take(&mut b)?.to_vec();
        out.push(Attribute {
            name,
            data_type,
            value,
        });
    }
    Some(out)
}

/// MD5OfMessageAttributes (or ...SystemAttributes) of these attributes; `None` for none.
pub fn attributes_md5(attrs: &[Attribute]) -> Option<String> {
    (!attrs.is_empty()).then(|| md5_hex(&encode(attrs)))
}

/// The record headers of a message's attributes.
pub fn headers(attrs: &[Attribute], system: &[Attribute]) -> Vec<v1::Header> {
    let mut out = Vec::new();
    if !attrs.is_empty() {
        out.push(v1::Header {
            name: ATTRIBUTES_HEADER.into(),
            value: Bytes::from(encode(attrs)),
        });
        for a in attrs {
            out.push(v1::Header {
                name: a.name.clone(),
                value: Bytes::from(a.value.clone()),
            });
        }
    }
    if !system.is_empty() {
        out.push(v1::Header {
            name: SYSTEM_ATTRIBUTES_HEADER.into(),
            value: Bytes::from(encode(system)),
        });
    }
    out
}

/// A record's message attributes: those an SQS client sent, or, for a record another
/// protocol wrote, its plain headers (as String when UTF-8 text, else Binary).
pub fn attributes_of(record: &v1::Record) -> Vec<Attribute> {
    if let Some(h) = record.headers.iter().find(|h| h.name == ATTRIBUTES_HEADER) {
        return decode(&h.value).unwrap_or_default();
    }
    let mut out: Vec<Attribute> = record
        .headers
        .iter()
        .filter(|h| check_name(&h.name).is_ok() && !h.name.contains('.') && !h.value.is_empty())
        .map(|h| match std::str::from_utf8(&h.value) {
            Ok(s) if s.chars().all(allowed_char) => Attribute {
                name: h.name.clone(),
                data_type: "String".into(),
                value: h.value.to_vec(),
            },
            _ => Attribute {
                name: h.name.clone(),
                data_type: "Binary".into(),
                value: h.value.to_vec(),
            },
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out.dedup_by(|a, b| a.name == b.name);
    out
}

pub fn system_attributes_of(record: &v1::Record) -> Vec<Attribute> {
    record
        .headers
        .iter()
        .find(|h| h.name == SYSTEM_ATTRIBUTES_HEADER)
        .and_then(|h| decode(&h.value))
        .unwrap_or_default()
}

/// Whether `name` is selected by MessageAttributeNames (`All`, `.*`, a name, or a prefix
/// ending in `.*`).
pub fn selected(names: &[String], name: &str) -> bool {
    names.iter().any(|n| {
        n == "All"
            || n == ".*"
            || n == name
            || n.strip_suffix(".*").is_some_and(|p| {
                name.len() > p.len() && name.starts_with(p) && name.as_bytes()[p.len()] == b'.'
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(v: Value) -> Vec<Attribute> {
        parse_attributes("message attribute", v.as_object().unwrap()).unwrap()
    }

    #[test]
    fn md5s_match_what_the_sdks_compute() {
        assert_eq!(md5_hex(b"hello"), "5d41402abc4b2a76b9719d911017c592");
        // Digest of {"color": String "red"} as botocore computes it (name, type, transport
        // byte 1, value; each length-prefixed, big-endian).
        let a = attrs(json!({"color": {"DataType": "String", "StringValue": "red"}}));
        let mut expected = Vec::new();
        expected.extend_from_slice(&[0, 0, 0, 5]);
        expected.extend_from_slice(b"color");
        expected.extend_from_slice(&[0, 0, 0, 6]);
        expected.extend_from_slice(b"String");
        expected.push(1);
        expected.extend_from_slice(&[0, 0, 0, 3]);
        expected.extend_from_slice(b"red");
        assert_eq!(encode(&a), expected);
        assert_eq!(attributes_md5(&a).unwrap(), md5_hex(&expected));
        // Sorted by name, binary with transport byte 2.
        let a = attrs(json!({
            "z": {"DataType": "Number", "StringValue": "1.5"},
            "b": {"DataType": "Binary.gz", "BinaryValue": "AAEC"},
        }));
        assert_eq!(a[0].name, "b");
        assert_eq!(a[0].value, vec![0, 1, 2]);
        assert_eq!(decode(&encode(&a)).unwrap(), a);
    }

    #[test]
    fn bad_attributes_are_refused() {
        let bad = [
            json!({"AWS.x": {"DataType": "String", "StringValue": "v"}}),
            json!({"a..b": {"DataType": "String", "StringValue": "v"}}),
            json!({"a": {"DataType": "Text", "StringValue": "v"}}),
            json!({"a": {"DataType": "Number", "StringValue": "ten"}}),
            json!({"a": {"DataType": "Binary", "StringValue": "v"}}),
            json!({"a": {"DataType": "String", "StringValue": ""}}),
            json!({"a": {"DataType": "String"}}),
            json!({"a": "v"}),
        ];
        for b in bad {
            assert!(
                parse_attributes("message attribute", b.as_object().unwrap()).is_err(),
                "{b}"
            );
        }
        let mut many = Map::new();
        for i in 0..11 {
            many.insert(
                format!("a{i}"),
                json!({"DataType": "String", "StringValue": "v"}),
            );
        }
        assert!(parse_attributes("message attribute", &many).is_err());
        assert_eq!(
            check_text("body", "a\u{0}b").unwrap_err().code,
            "InvalidMessageContents"
        );
        assert!(check_text("body", "tab\tok \u{10FFFF}").is_ok());
        assert!(decode(&[0, 0, 0, 9, 1]).is_none());
        assert!(decode(&[0xff, 0xff, 0xff, 0xff]).is_none());
    }

    #[test]
    fn attribute_names_select_by_name_and_prefix() {
        let names = vec!["color".to_string(), "size.*".to_string()];
        assert!(selected(&names, "color"));
        assert!(selected(&names, "size.x"));
        assert!(!selected(&names, "size"));
        assert!(!selected(&names, "sizes.x"));
        assert!(selected(&["All".to_string()], "anything"));
    }
}
