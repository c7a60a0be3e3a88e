//! MCP over Streamable HTTP: the JSON-RPC message an agent POSTs, read
//! strictly, and the upstream's answer to `tools/list`, cut down to the
//! tools the token may call.
//!
//! A message is one JSON object (batches were dropped from MCP in
//! 2025-06-18 and are refused), with no key twice at any level and
//! within size and depth limits. What goes upstream is the message as
//! parsed, written again in canonical form: the server sees exactly the
//! call that was decided, whatever its JSON parser makes of duplicate
//! keys or odd whitespace.

use mayfly_core::{ArgumentLimits, Arguments, ArgumentsError, Tool, canonical_json};
use serde_json::{Map, Value};

use crate::refusal::{Refusal, code};

/// The `_meta` key under which an agent may name an approval.
pub const APPROVAL_META: &str = "mayfly/approval_id";

/// What a message asks.
#[derive(Debug)]
pub enum Kind {
    /// `tools/call`: decided before it goes on.
    CallTool {
        /// The request's id.
        id: Value,
        /// `<upstream>/<name>`.
        tool: Tool,
        /// Its arguments.
        arguments: Arguments,
        /// An approval named in `_meta`.
        approval_id: Option<String>,
    },
    /// `tools/list`: its answer is filtered.
    ListTools {
        /// The request's id.
        id: Value,
    },
    /// `initialize`: forwarded as is; the session its answer names is the
    /// token's task's.
    Initialize {
        /// Whether the client takes URL elicitations
        /// (`capabilities.elicitation.url`).
        url_elicitation: bool,
    },
    /// Anything else (ping, notifications, the client's answers to the
    /// server's requests): forwarded as is.
    Other,
}

/// A message read from an agent.
#[derive(Debug)]
pub struct Message {
    /// What it asks.
    pub kind: Kind,
    /// The body to forward: the message in canonical form.
    pub body: String,
}

/// The id of a message, when it could be read (for an error's `id`).
pub fn id_of(body: &[u8]) -> Value {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("id").cloned())
        .unwrap_or(Value::Null)
}

/// Reads one message from `body` (at most `max_bytes`), for `upstream`.
pub fn read(body: &[u8], upstream: &str, max_bytes: usize) -> Result<Message, Refusal> {
    let text = std::str::from_utf8(body)
        .map_err(|_| Refusal::bad_request("parse_error", code::PARSE_ERROR, "body is not UTF-8"))?;
    if text.trim_start().starts_with('[') {
        return Err(invalid(
            "JSON-RPC batches are not supported: send one message",
        ));
    }
    let limits = ArgumentLimits {
        max_bytes,
        // Roomier than the arguments' own limits, which are checked on
        // them with a precise error.
        max_depth: 32,
        max_values: 8 * ArgumentLimits::default().max_values,
    };
    let message = match Arguments::parse(text, &limits) {
        Ok(m) => m,
        Err(ArgumentsError::Malformed(e)) => {
            return Err(Refusal::bad_request(
                "parse_error",
                code::PARSE_ERROR,
                format!("not JSON: {e}"),
            ));
        }
        Err(ArgumentsError::NotAnObject) => {
            return Err(invalid("a JSON-RPC message is one JSON object"));
        }
        Err(e) => return Err(invalid(&message_error(&e))),
    };
    let map = message.value();
    if map.get("jsonrpc") != Some(&Value::String("2.0".into())) {
        return Err(invalid("not JSON-RPC 2.0 (jsonrpc must be \"2.0\")"));
    }
    let kind = match map.get("method") {
        None => Kind::Other,
        Some(Value::String(m)) if m == "tools/call" => call_tool(map, upstream)?,
        Some(Value::String(m)) if m == "tools/list" => Kind::ListTools {
            id: request_id(map)?,
        },
        Some(Value::String(m)) if m == "initialize" => Kind::Initialize {
            url_elicitation: map
                .get("params")
                .and_then(|p| p.get("capabilities"))
                .and_then(|c| c.get("elicitation"))
                .and_then(|e| e.get("url"))
                .is_some_and(Value::is_object),
        },
        Some(Value::String(_)) => Kind::Other,
        Some(_) => return Err(invalid("method must be a string")),
    };
    Ok(Message {
        kind,
        body: message.canonical().to_owned(),
    })
}

/// A limit's error, said of the message rather than of arguments.
fn message_error(e: &ArgumentsError) -> String {
    match e {
        ArgumentsError::TooLarge(n, max) => {
            format!("the message is {n} bytes, over the limit of {max}")
        }
        ArgumentsError::TooDeep(d) => format!("the message nests deeper than {d} levels"),
        ArgumentsError::TooMany(n) => format!("the message holds more than {n} values"),
        ArgumentsError::DuplicateKey(k) => {
            format!("the message repeats the key {k:?} in one object")
        }
        other => other.to_string(),
    }
}

fn invalid(detail: &str) -> Refusal {
    Refusal::bad_request("invalid_request", code::INVALID_REQUEST, detail)
}

fn invalid_params(error: &str, detail: String) -> Refusal {
    Refusal::bad_request(error, code::INVALID_PARAMS, detail)
}

/// A request's id: a string or an integer (a notification has none).
fn request_id(map: &Map<String, Value>) -> Result<Value, Refusal> {
    match map.get("id") {
        Some(id @ Value::String(_)) => Ok(id.clone()),
        Some(id @ Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(id.clone()),
        _ => Err(invalid(
            "this method is a request: it needs an id (a string or an integer)",
        )),
    }
}

fn call_tool(map: &Map<String, Value>, upstream: &str) -> Result<Kind, Refusal> {
    let id = request_id(map)?;
    let Some(Value::Object(params)) = map.get("params") else {
        return Err(invalid_params(
            "invalid_params",
            "tools/call needs params: {name, arguments}".into(),
        ));
    };
    let Some(Value::String(name)) = params.get("name") else {
        return Err(invalid_params(
            "invalid_params",
            "tools/call needs params.name, a string".into(),
        ));
    };
    let tool =
        Tool::new(upstream, name).map_err(|e| invalid_params("invalid_tool", format!("{e}")))?;
    let arguments = match params.get("arguments") {
        None => Arguments::empty(),
        Some(v @ Value::Object(_)) => {
            Arguments::parse(&canonical_json(v), &ArgumentLimits::default())
                .map_err(|e| invalid_params("invalid_arguments", e.to_string()))?
        }
        Some(_) => {
            return Err(invalid_params(
                "invalid_arguments",
                "params.arguments must be a JSON object".into(),
            ));
        }
    };
    let approval_id = match params.get("_meta").and_then(|m| m.get(APPROVAL_META)) {
        None => None,
        Some(Value::String(a)) => Some(a.clone()),
        Some(_) => {
            return Err(invalid_params(
                "invalid_params",
                format!("_meta.{APPROVAL_META} must be a string"),
            ));
        }
    };
    Ok(Kind::CallTool {
        id,
        tool,
        arguments,
        approval_id,
    })
}

/// The tool names of a `tools/list` result in `message` (a response to
/// `id`), if it is one.
pub fn listed_tools(message: &Value, id: &Value) -> Option<Vec<String>> {
    if message.get("id") != Some(id) {
        return None;
    }
    let tools = message.get("result")?.get("tools")?.as_array()?;
    Some(
        tools
            .iter()
            .filter_map(|t| t.get("name")?.as_str().map(str::to_owned))
            .collect(),
    )
}

/// `message` with only the tools named in `keep`.
pub fn keep_tools(message: &mut Value, keep: &[String]) {
    if let Some(tools) = message
        .get_mut("result")
        .and_then(|r| r.get_mut("tools"))
        .and_then(Value::as_array_mut)
    {
        tools.retain(|t| {
            t.get("name")
                .and_then(Value::as_str)
                .is_some_and(|n| keep.iter().any(|k| k == n))
        });
    }
}

/// One server-sent event, its fields in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// `(field, value)`, `data` once per line of data.
    pub fields: Vec<(String, String)>,
}

impl Event {
    /// Its data: the `data` lines joined by line feeds.
    pub fn data(&self) -> Option<String> {
        let lines: Vec<&str> = self
            .fields
            .iter()
            .filter(|(f, _)| f == "data")
            .map(|(_, v)| v.as_str())
            .collect();
        (!lines.is_empty()).then(|| lines.join("\n"))
    }

    /// Replaces its data with `data` (one line).
    pub fn set_data(&mut self, data: &str) {
        let at = self.fields.iter().position(|(f, _)| f == "data");
        self.fields.retain(|(f, _)| f != "data");
        let at = at.unwrap_or(self.fields.len()).min(self.fields.len());
        self.fields.insert(at, ("data".into(), data.to_owned()));
    }
}

/// The events of a whole `text/event-stream` body (the HTML standard's
/// parsing: any of CRLF, LF or CR ends a line, a blank line ends an
/// event, a line starting with `:` is a comment).
pub fn parse_events(text: &str) -> Vec<Event> {
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    let mut events = Vec::new();
    let mut current = Vec::new();
    for line in text.split('\n') {
        if line.is_empty() {
            if !current.is_empty() {
                events.push(Event {
                    fields: std::mem::take(&mut current),
                });
            }
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        current.push((field.to_owned(), value.to_owned()));
    }
    if !current.is_empty() {
        events.push(Event { fields: current });
    }
    events
}

/// `events` as a `text/event-stream` body.
pub fn write_events(events: &[Event]) -> String {
    let mut out = String::new();
    for e in events {
        for (f, v) in &e.fields {
            for line in v.split('\n') {
                out.push_str(f);
                out.push_str(": ");
                out.push_str(line);
                out.push('\n');
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    fn refusal(body: &str) -> Refusal {
        read(body.as_bytes(), "billing", MAX).unwrap_err()
    }

    #[test]
    fn a_call_is_read_with_its_tool_arguments_and_approval() {
        let m = read(
            br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"pay_invoice","arguments":{"amount":5, "id":"a"},"_meta":{"mayfly/approval_id":"apr_1"}}}"#,
            "billing",
            MAX,
        )
        .unwrap();
        let Kind::CallTool {
            id,
            tool,
            arguments,
            approval_id,
        } = m.kind
        else {
            panic!("not a call");
        };
        assert_eq!(id, 7);
        assert_eq!(tool.to_string(), "billing/pay_invoice");
        assert_eq!(arguments.canonical(), r#"{"amount":5,"id":"a"}"#);
        assert_eq!(approval_id.as_deref(), Some("apr_1"));
        // What goes on holds the arguments exactly as decided.
        assert!(m.body.contains(r#""arguments":{"amount":5,"id":"a"}"#));
    }

    #[test]
    fn hostile_messages_are_refused_with_the_right_code() {
        let batch = refusal(r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#);
        assert_eq!(batch.rpc_code, code::INVALID_REQUEST);
        assert!(batch.detail.contains("batches"));
        assert_eq!(refusal("{nope").rpc_code, code::PARSE_ERROR);
        // The same key twice, anywhere: which one counts depends on the
        // parser, so neither does.
        let dup = refusal(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call","params":{"name":"x"}}"#,
        );
        assert_eq!(dup.rpc_code, code::INVALID_REQUEST);
        assert!(dup.detail.contains("method"), "{}", dup.detail);
        let dup_arg = refusal(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"pay","arguments":{"amount":1,"amount":1000}}}"#,
        );
        assert!(dup_arg.detail.contains("amount"), "{}", dup_arg.detail);
        let bomb = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"pay","arguments":{{"a":{}1{}}}}}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert!(refusal(&bomb).detail.contains("deeper"));
        let deep_args = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"pay","arguments":{{"a":{}1{}}}}}}}"#,
            "[".repeat(8),
            "]".repeat(8)
        );
        let r = refusal(&deep_args);
        assert_eq!(r.rpc_code, code::INVALID_PARAMS);
        assert_eq!(r.error, "invalid_arguments");
        for name in ["../admin", "pay invoice", "", "a/b", "pay\u{0}"] {
            let r = refusal(
                &serde_json::json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":name}})
                    .to_string(),
            );
            assert_eq!(r.error, "invalid_tool", "{name:?}");
        }
        let no_id = refusal(r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"pay"}}"#);
        assert_eq!(no_id.rpc_code, code::INVALID_REQUEST);
        let r = refusal(r#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#);
        assert_eq!(r.rpc_code, code::INVALID_REQUEST);
        let big = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"pay","arguments":{{"a":"{}"}}}}}}"#,
            "x".repeat(70_000)
        );
        assert!(refusal(&big).detail.contains("over the limit"));
    }

    #[test]
    fn a_list_keeps_only_the_callable_tools_in_sse_too() {
        let body = "event: message\r\nid: 1\r\ndata: {\"jsonrpc\":\"2.0\",\"id\":3,\"result\":{\"tools\":[{\"name\":\"read\"},{\"name\":\"delete\"}]}}\r\n\r\n: ping\n\n";
        let mut events = parse_events(body);
        assert_eq!(events.len(), 1);
        let mut msg: Value = serde_json::from_str(&events[0].data().unwrap()).unwrap();
        let id = Value::from(3);
        assert_eq!(
            listed_tools(&msg, &id).unwrap(),
            vec!["read".to_owned(), "delete".to_owned()]
        );
        assert_eq!(listed_tools(&msg, &Value::from(4)), None);
        keep_tools(&mut msg, &["read".to_owned()]);
        events[0].set_data(&msg.to_string());
        let out = write_events(&events);
        assert!(out.starts_with("event: message\nid: 1\ndata: "), "{out}");
        assert!(!out.contains("delete"));
        assert_eq!(parse_events(&out), events);
    }
}
