//! A request's parameters, one shape for both wire protocols: the JSON protocol's object
//! as sent, and the query protocol's flat form fields (`Attribute.1.Name=...`) turned into
//! the same object, so every action reads its parameters one way.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::error::{SqsError, SqsResult};

/// Query-protocol list and map members and the JSON names they take.
const RENAMES: &[(&str, &str)] = &[
    ("Attribute", "Attributes"),
    ("Tag", "Tags"),
    ("MessageAttribute", "MessageAttributes"),
    ("MessageSystemAttribute", "MessageSystemAttributes"),
    ("AttributeName", "AttributeNames"),
    ("MessageAttributeName", "MessageAttributeNames"),
    ("MessageSystemAttributeName", "MessageSystemAttributeNames"),
    ("TagKey", "TagKeys"),
    ("AWSAccountId", "AWSAccountIds"),
    ("ActionName", "Actions"),
    ("SendMessageBatchRequestEntry", "Entries"),
    ("DeleteMessageBatchRequestEntry", "Entries"),
    ("ChangeMessageVisibilityBatchRequestEntry", "Entries"),
];

/// Deepest `A.1.B.2...` nesting a query parameter may have (a message attribute in a batch
/// entry is five levels deep).
const MAX_DEPTH: usize = 8;

#[derive(Debug, Clone, Default)]
pub struct Params(pub Map<String, Value>);

impl Params {
    /// The JSON protocol's body: an object (an empty body is no parameters).
    pub fn from_json(body: &[u8]) -> SqsResult<Self> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(m)) => Ok(Self(m)),
            Ok(_) => Err(SqsError::serialization(
                "the request body is not a JSON object",
            )),
            Err(e) => Err(SqsError::serialization(format!(
                "the request body is not valid JSON: {e}"
            ))),
        }
    }

    /// The query protocol's fields (`Action` and `Version` included, as sent).
    pub fn from_form(fields: &[(String, String)]) -> SqsResult<Self> {
        let mut root = Node::default();
        for (key, value) in fields {
            let parts: Vec<&str> = key.split('.').collect();
            if parts.len() > MAX_DEPTH || parts.iter().any(|p| p.is_empty()) {
                return Err(SqsError::invalid_parameter_value(format!(
                    "The parameter {key} is not recognized."
                )));
            }
            root.insert(&parts, value.clone());
        }
        match root.into_value() {
            Value::Object(m) => Ok(Self(m)),
            _ => Ok(Self::default()),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    pub fn str(&self, name: &str) -> SqsResult<Option<&str>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(SqsError::bad_value(name, v, "must be a string")),
        }
    }

    pub fn required_str(&self, name: &str) -> SqsResult<&str> {
        self.str(name)?.ok_or_else(|| SqsError::missing(name))
    }

    /// A whole number, sent as a JSON number or (query protocol) as text.
    pub fn int(&self, name: &str) -> SqsResult<Option<i64>> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => as_int(v)
                .map(Some)
                .ok_or_else(|| SqsError::bad_value(name, v, "must be an integer")),
        }
    }

    /// A whole number in `min..=max`.
    pub fn int_in(&self, name: &str, min: i64, max: i64) -> SqsResult<Option<i64>> {
        match self.int(name)? {
            Some(n) if !(min..=max).contains(&n) => Err(SqsError::bad_value(
                name,
                n,
                &format!("must be between {min} and {max}"),
            )),
            n => Ok(n),
        }
    }

    pub fn strings(&self, name: &str) -> SqsResult<Vec<String>> {
        match self.get(name) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    v => Err(SqsError::bad_value(name, v, "must be a list of strings")),
                })
                .collect(),
            Some(v) => Err(SqsError::bad_value(name, v, "must be a list of strings")),
        }
    }

    /// A map of strings (queue attributes, tags); numbers and booleans are taken as their
    /// text, as the SDKs of typed languages sometimes send them.
    pub fn string_map(&self, name: &str) -> SqsResult<BTreeMap<String, String>> {
        match self.get(name) {
            None => Ok(BTreeMap::new()),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    Value::Number(n) => Ok((k.clone(), n.to_string())),
                    Value::Bool(b) => Ok((k.clone(), b.to_string())),
                    v => Err(SqsError::bad_value(name, v, "must map names to strings")),
                })
                .collect(),
            Some(v) => Err(SqsError::bad_value(name, v, "must be a map")),
        }
    }

    pub fn object(&self, name: &str) -> SqsResult<Map<String, Value>> {
        match self.get(name) {
            None => Ok(Map::new()),
            Some(Value::Object(m)) => Ok(m.clone()),
            Some(v) => Err(SqsError::bad_value(name, v, "must be a map")),
        }
    }

    /// A list of objects (batch entries).
    pub fn entries(&self, name: &str) -> SqsResult<Vec<Params>> {
        match self.get(name) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::Object(m) => Ok(Params(m.clone())),
                    v => Err(SqsError::bad_value(name, v, "must be a list of entries")),
                })
                .collect(),
            Some(v) => Err(SqsError::bad_value(name, v, "must be a list of entries")),
        }
    }

    pub fn bool(&self, name: &str) -> SqsResult<Option<bool>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::String(s)) if s == "true" => Ok(Some(true)),
            Some(Value::String(s)) if s == "false" => Ok(Some(false)),
            Some(v) => Err(SqsError::bad_value(name, v, "must be true or false")),
        }
    }
}

pub fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A query parameter tree under construction: `A.1.B` puts B under index 1 of A.
#[derive(Debug, Default)]
struct Node {
    value: Option<String>,
    children: BTreeMap<String, Node>,
}

impl Node {
    fn insert(&mut self, path: &[&str], value: String) {
        match path.split_first() {
            None => self.value = Some(value),
            Some((first, rest)) => self
                .children
                .entry((*first).to_string())
                .or_default()
                .insert(rest, value),
        }
    }

    fn into_value(self) -> Value {
        if self.children.is_empty() {
            return self.value.map_or(Value::Null, Value::String);
        }
        // Members numbered 1, 2, ... are a list, in their numbers' order.
        if self.children.keys().all(|k| k.parse::<u32>().is_ok()) {
            let mut items: Vec<(u32, Node)> = self
                .children
                .into_iter()
                .map(|(k, n)| (k.parse().unwrap_or(0), n))
                .collect();
            items.sort_by_key(|(i, _)| *i);
            return Value::Array(items.into_iter().map(|(_, n)| n.into_value()).collect());
        }
        let mut out = Map::new();
        for (k, n) in self.children {
            let v = n.into_value();
            let (name, v) = match RENAMES.iter().find(|(q, _)| *q == k) {
                Some((q, json)) => (json.to_string(), reshape(q, v)),
                None => (k, v),
            };
            out.insert(name, v);
        }
        Value::Object(out)
    }
}

/// A query list of `{Name, Value}` / `{Key, Value}` entries as the JSON map it stands for;
/// other lists stay lists.
fn reshape(member: &str, v: Value) -> Value {
    let (key, value) = match member {
        "Attribute" | "MessageAttribute" | "MessageSystemAttribute" => ("Name", "Value"),
        "Tag" => ("Key", "Value"),
        _ => return v,
    };
    let Value::Array(items) = v else { return v };
    let mut m = Map::new();
    for item in items {
        if let Value::Object(mut o) = item
            && let Some(Value::String(k)) = o.remove(key)
        {
            m.insert(k, o.remove(value).unwrap_or(Value::Null));
        }
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> Params {
        let fields: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Params::from_form(&fields).unwrap()
    }

    #[test]
    fn query_fields_become_the_json_shape() {
        let p = form(&[
            ("Action", "SendMessageBatch"),
            ("SendMessageBatchRequestEntry.2.Id", "b"),
            ("SendMessageBatchRequestEntry.1.Id", "a"),
            ("SendMessageBatchRequestEntry.1.MessageBody", "hello"),
            (
                "SendMessageBatchRequestEntry.1.MessageAttribute.1.Name",
                "color",
            ),
            (
                "SendMessageBatchRequestEntry.1.MessageAttribute.1.Value.StringValue",
                "red",
            ),
            (
                "SendMessageBatchRequestEntry.1.MessageAttribute.1.Value.DataType",
                "String",
            ),
            ("Attribute.1.Name", "VisibilityTimeout"),
            ("Attribute.1.Value", "40"),
            ("AttributeName.2", "B"),
            ("AttributeName.1", "A"),
        ]);
        let entries = p.entries("Entries").unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].str("Id").unwrap(), Some("a"));
        let attrs = entries[0].object("MessageAttributes").unwrap();
        assert_eq!(attrs["color"]["StringValue"], "red");
        assert_eq!(
            p.string_map("Attributes").unwrap()["VisibilityTimeout"],
            "40"
        );
        assert_eq!(p.strings("AttributeNames").unwrap(), vec!["A", "B"]);
        assert_eq!(p.int("Attributes").ok(), None);
    }

    #[test]
    fn bad_shapes_are_errors_not_panics() {
        let deep = "A.".repeat(20) + "B";
        let fields = vec![(deep, "x".to_string())];
        assert!(Params::from_form(&fields).is_err());
        assert!(Params::from_form(&[("A..B".into(), "x".into())]).is_err());
        assert_eq!(
            Params::from_json(b"[1]").unwrap_err().code,
            "SerializationException"
        );
        assert!(Params::from_json(b"{").is_err());
        let p = Params::from_json(br#"{"MaxNumberOfMessages": "x", "N": 11}"#).unwrap();
        assert_eq!(
            p.int("MaxNumberOfMessages").unwrap_err().code,
            "InvalidParameterValue"
        );
        assert!(p.int_in("N", 1, 10).is_err());
        // A value and members under one name: the members win, nothing panics.
        let p = form(&[("Tag", "x"), ("Tag.1.Key", "k"), ("Tag.1.Value", "v")]);
        assert_eq!(p.string_map("Tags").unwrap()["k"], "v");
    }
}
