//! Answers on the wire: the JSON protocol's body as the actions build it, and the query
//! protocol's XML made from the same value (its lists and maps spelled the query way:
//! `<Attribute><Name/><Value/></Attribute>`, one `<QueueUrl>` per URL, ...).

use serde_json::Value;

use crate::error::SqsError;

pub const XMLNS: &str = "http://queue.amazonaws.com/doc/2012-11-05/";

pub fn escape(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Characters XML cannot carry literally (carriage returns would be read back
            // as newlines): as references.
            '\r' => out.push_str("&#xD;"),
            c => out.push(c),
        }
    }
}

fn scalar(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => escape(s, out),
        Value::Null => {}
        other => escape(&other.to_string(), out),
    }
}

fn element(name: &str, v: &Value, action: &str, out: &mut String) {
    match (name, v) {
        ("Attributes" | "MessageAttributes" | "Tags", Value::Object(m)) => {
            let (tag, key) = match name {
                "Attributes" => ("Attribute", "Name"),
                "MessageAttributes" => ("MessageAttribute", "Name"),
                _ => ("Tag", "Key"),
            };
            for (k, v) in m {
                out.push_str(&format!("<{tag}><{key}>"));
                escape(k, out);
                out.push_str(&format!("</{key}>"));
                element("Value", v, action, out);
                out.push_str(&format!("</{tag}>"));
            }
        }
        (_, Value::Array(items)) => {
            let tag = match name {
                "QueueUrls" | "queueUrls" => "QueueUrl".to_string(),
                "Messages" => "Message".to_string(),
                "Successful" => format!("{action}ResultEntry"),
                "Failed" => "BatchResultErrorEntry".to_string(),
                "Results" => format!("{action}ResultEntry"),
                other => other.to_string(),
            };
            for item in items {
                element(&tag, item, action, out);
            }
        }
        (_, Value::Object(m)) => {
            out.push_str(&format!("<{name}>"));
            for (k, v) in m {
                element(k, v, action, out);
            }
            out.push_str(&format!("</{name}>"));
        }
        (_, v) => {
            out.push_str(&format!("<{name}>"));
            scalar(v, out);
            out.push_str(&format!("</{name}>"));
        }
    }
}

/// `<ActionResponse><ActionResult>...</ActionResult><ResponseMetadata>...`; an action with
/// nothing to say has no Result element, as SQS answers.
pub fn xml_response(action: &str, result: &Value, request_id: &str) -> String {
    let mut out = format!("<?xml version=\"1.0\"?><{action}Response xmlns=\"{XMLNS}\">");
    if let Value::Object(m) = result
        && !m.is_empty()
    {
        out.push_str(&format!("<{action}Result>"));
        for (k, v) in m {
            element(k, v, action, &mut out);
        }
        out.push_str(&format!("</{action}Result>"));
    }
    out.push_str("<ResponseMetadata><RequestId>");
    escape(request_id, &mut out);
    out.push_str(&format!(
        "</RequestId></ResponseMetadata></{action}Response>"
    ));
    out
}

pub fn xml_error(e: &SqsError, request_id: &str) -> String {
    let mut out = format!(
        "<?xml version=\"1.0\"?><ErrorResponse xmlns=\"{XMLNS}\"><Error><Type>{}</Type><Code>{}</Code><Message>",
        e.fault(),
        e.code
    );
    escape(&e.message, &mut out);
    out.push_str("</Message><Detail/></Error><RequestId>");
    escape(request_id, &mut out);
    out.push_str("</RequestId></ErrorResponse>");
    out
}

pub fn json_error(e: &SqsError) -> String {
    serde_json::json!({
        "__type": format!("com.amazonaws.sqs#{}", e.shape),
        "message": e.message,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lists_and_maps_take_the_query_spelling() {
        let v = json!({
            "Messages": [{
                "Body": "a<b & \"c\"\r",
                "Attributes": {"SentTimestamp": "1"},
                "MessageAttributes": {"k": {"DataType": "String", "StringValue": "v"}},
            }],
        });
        let xml = xml_response("ReceiveMessage", &v, "rid");
        assert!(!xml.contains("<Attributes>"));
        assert!(xml.contains(
            "<Message><Attribute><Name>SentTimestamp</Name><Value>1</Value></Attribute>"
        ));
        assert!(xml.contains("<Body>a&lt;b &amp; &quot;c&quot;&#xD;</Body>"));
        assert!(xml.contains("<MessageAttribute><Name>k</Name><Value><DataType>String</DataType><StringValue>v</StringValue></Value></MessageAttribute>"));
        let xml = xml_response("ListQueues", &json!({"QueueUrls": ["u1", "u2"]}), "r");
        assert!(xml.contains("<QueueUrl>u1</QueueUrl><QueueUrl>u2</QueueUrl>"));
        let xml = xml_response(
            "SendMessageBatch",
            &json!({"Successful": [{"Id": "a"}], "Failed": []}),
            "r",
        );
        assert!(
            xml.contains("<SendMessageBatchResultEntry><Id>a</Id></SendMessageBatchResultEntry>")
        );
        let xml = xml_response("DeleteQueue", &json!({}), "r");
        assert!(!xml.contains("DeleteQueueResult"));
    }
}
