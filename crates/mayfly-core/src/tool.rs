//! Tool calls: what an agent does with a task credential, through a
//! gateway. A call names a [`Tool`] (`<upstream>/<tool>`) and carries
//! [`Arguments`], a JSON object parsed strictly and within
//! [`ArgumentLimits`]: no duplicate key, no nesting or size past the
//! limits. Policy decides on the parsed value; the trail holds the SHA-256
//! of its canonical form ([`Arguments::sha256`]), never the arguments.

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Longest upstream name.
pub const MAX_UPSTREAM_BYTES: usize = 63;
/// Longest tool name (MCP's own bound for tool names).
pub const MAX_TOOL_BYTES: usize = 128;

/// Why a tool name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ToolNameError {
    /// An upstream name that is not 1–63 of `a-z`, `0-9`, `-`, `_`,
    /// starting with a letter or digit.
    #[error(
        "upstream {0:?} is not a plain name (1-63 of a-z, 0-9, '-', '_', starting with a letter or digit)"
    )]
    Upstream(String),
    /// A tool name that is not 1–128 of `A-Z`, `a-z`, `0-9`, `_`, `-`, `.`.
    #[error("tool name {0:?} is not a plain identifier (1-128 of A-Z, a-z, 0-9, '_', '-', '.')")]
    Tool(String),
    /// Not `<upstream>/<tool>`.
    #[error("tool {0:?} is not <upstream>/<tool>")]
    Shape(String),
}

/// A tool behind a gateway: `<upstream>/<tool>`, as policy names it
/// (`Mayfly::Tool::"billing/pay_invoice"`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tool {
    upstream: String,
    name: String,
}

/// Checks an upstream's name: 1–63 of `a-z`, `0-9`, `-`, `_`, starting
/// with a letter or digit.
pub fn check_upstream(s: &str) -> Result<(), ToolNameError> {
    let ok = !s.is_empty()
        && s.len() <= MAX_UPSTREAM_BYTES
        && s.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ToolNameError::Upstream(s.to_owned()))
    }
}

fn check_tool(s: &str) -> Result<(), ToolNameError> {
    let ok = !s.is_empty()
        && s.len() <= MAX_TOOL_BYTES
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(ToolNameError::Tool(s.to_owned()))
    }
}

impl Tool {
    /// The tool `name` of `upstream`, each checked.
    pub fn new(upstream: &str, name: &str) -> Result<Self, ToolNameError> {
        check_upstream(upstream)?;
        check_tool(name)?;
        Ok(Self {
            upstream: upstream.to_owned(),
            name: name.to_owned(),
        })
    }

    /// Parses `<upstream>/<tool>`.
    pub fn parse(s: &str) -> Result<Self, ToolNameError> {
        let (upstream, name) = s
            .split_once('/')
            .ok_or_else(|| ToolNameError::Shape(s.to_owned()))?;
        Self::new(upstream, name)
    }

    /// The upstream it belongs to.
    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    /// Its name at the upstream (an MCP tool's `name`).
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl serde::Serialize for Tool {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Tool {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(de::Error::custom)
    }
}

impl fmt::Display for Tool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.upstream, self.name)
    }
}

impl fmt::Debug for Tool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tool({self})")
    }
}

/// How much a call's arguments may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArgumentLimits {
    /// Bytes of the JSON text.
    pub max_bytes: usize,
    /// Nesting of objects and arrays: the arguments object itself is
    /// depth 1.
    pub max_depth: usize,
    /// Values in all (every object, array, string, number, bool, null).
    pub max_values: usize,
}

impl Default for ArgumentLimits {
    /// 64 KiB, depth 8, 4096 values.
    fn default() -> Self {
        Self {
            max_bytes: 64 * 1024,
            max_depth: 8,
            max_values: 4096,
        }
    }
}

/// Why arguments were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ArgumentsError {
    /// Longer than [`ArgumentLimits::max_bytes`].
    #[error("arguments are {0} bytes, over the limit of {1}")]
    TooLarge(usize, usize),
    /// Nested deeper than [`ArgumentLimits::max_depth`].
    #[error("arguments nest deeper than {0} levels")]
    TooDeep(usize),
    /// More values than [`ArgumentLimits::max_values`].
    #[error("arguments hold more than {0} values")]
    TooMany(usize),
    /// The same key twice in one object.
    #[error("arguments repeat the key {0:?} in one object")]
    DuplicateKey(String),
    /// Valid JSON, but not an object.
    #[error("arguments must be a JSON object")]
    NotAnObject,
    /// Not JSON.
    #[error("arguments are not valid JSON: {0}")]
    Malformed(String),
}

/// A tool call's arguments: a JSON object, parsed strictly and within
/// limits, with its canonical form's SHA-256.
#[derive(Clone, PartialEq, Eq)]
pub struct Arguments {
    value: Map<String, Value>,
    canonical: String,
    sha256: [u8; 32],
}

impl fmt::Debug for Arguments {
    /// The hash only: arguments may carry anything the agent sends.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Arguments(sha256:{})", self.sha256_hex())
    }
}

impl Arguments {
    /// Parses `json`: one object, no key twice in any object, within
    /// `limits`. Checked while parsing, so a nesting bomb stops at the
    /// limit.
    pub fn parse(json: &str, limits: &ArgumentLimits) -> Result<Self, ArgumentsError> {
        if json.len() > limits.max_bytes {
            return Err(ArgumentsError::TooLarge(json.len(), limits.max_bytes));
        }
        let mut budget = Budget {
            limits: *limits,
            values: 0,
            error: None,
        };
        let mut de = serde_json::Deserializer::from_str(json);
        let parsed = Strict {
            depth: 1,
            budget: &mut budget,
        }
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v));
        let value = match parsed {
            Ok(v) => v,
            Err(e) => {
                return Err(budget
                    .error
                    .take()
                    .unwrap_or_else(|| ArgumentsError::Malformed(e.to_string())));
            }
        };
        match value {
            Value::Object(map) => Ok(Self::from_map(map)),
            _ => Err(ArgumentsError::NotAnObject),
        }
    }

    /// No arguments (`{}`).
    pub fn empty() -> Self {
        Self::from_map(Map::new())
    }

    fn from_map(value: Map<String, Value>) -> Self {
        let mut canonical = String::new();
        write_object(&mut canonical, &value);
        let digest = ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes());
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(digest.as_ref());
        Self {
            value,
            canonical,
            sha256,
        }
    }

    /// The object.
    pub fn value(&self) -> &Map<String, Value> {
        &self.value
    }

    /// The canonical text: keys sorted by their UTF-8 bytes at every
    /// level, no insignificant whitespace, strings and numbers as
    /// serde_json writes them. What the upstream is sent, and what is
    /// hashed.
    pub fn canonical(&self) -> &str {
        &self.canonical
    }

    /// SHA-256 of [`canonical`](Self::canonical).
    pub fn sha256(&self) -> &[u8; 32] {
        &self.sha256
    }

    /// [`sha256`](Self::sha256) in lower-case hex, as the trail holds it.
    pub fn sha256_hex(&self) -> String {
        self.sha256.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// `v` in canonical form, as [`Arguments::canonical`] writes it.
pub fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(&mut out, v);
    out
}

/// Writes `v` with sorted keys and no whitespace.
fn write_canonical(out: &mut String, v: &Value) {
    match v {
        Value::Object(map) => write_object(out, map),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(out, item);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// Writes `map` with its keys sorted.
fn write_object(out: &mut String, map: &Map<String, Value>) {
    let mut entries: Vec<(&String, &Value)> = map.iter().collect();
    entries.sort_by_key(|(k, _)| *k);
    out.push('{');
    for (i, (k, v)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&Value::String(k.clone()).to_string());
        out.push(':');
        write_canonical(out, v);
    }
    out.push('}');
}

/// What a parse may still spend, and the first limit it broke.
struct Budget {
    limits: ArgumentLimits,
    values: usize,
    error: Option<ArgumentsError>,
}

impl Budget {
    /// Counts one value, an object or array at `depth` (scalars take no
    /// depth); fails past a limit.
    fn take<E: de::Error>(&mut self, depth: Option<usize>) -> Result<(), E> {
        self.values += 1;
        let broke = if depth.is_some_and(|d| d > self.limits.max_depth) {
            Some(ArgumentsError::TooDeep(self.limits.max_depth))
        } else if self.values > self.limits.max_values {
            Some(ArgumentsError::TooMany(self.limits.max_values))
        } else {
            None
        };
        match broke {
            Some(e) => {
                let message = e.to_string();
                self.error.get_or_insert(e);
                Err(E::custom(message))
            }
            None => Ok(()),
        }
    }

    fn refuse<E: de::Error>(&mut self, e: ArgumentsError) -> E {
        let message = e.to_string();
        self.error.get_or_insert(e);
        E::custom(message)
    }
}

/// One value at `depth`, parsed with the budget.
struct Strict<'b> {
    depth: usize,
    budget: &'b mut Budget,
}

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        self.budget.take(None)?;
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.budget.take(None)?;
        Ok(Value::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        self.budget.take(None)?;
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        self.budget.take(None)?;
        // serde_json never yields a non-finite number.
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.budget.take(None)?;
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        self.budget.take(None)?;
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.budget.take(None)?;
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.budget.take(Some(self.depth))?;
        let mut items = Vec::new();
        while let Some(v) = seq.next_element_seed(Strict {
            depth: self.depth + 1,
            budget: &mut *self.budget,
        })? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.budget.take(Some(self.depth))?;
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(self.budget.refuse(ArgumentsError::DuplicateKey(key)));
            }
            let v = map.next_value_seed(Strict {
                depth: self.depth + 1,
                budget: &mut *self.budget,
            })?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Arguments, ArgumentsError> {
        Arguments::parse(s, &ArgumentLimits::default())
    }

    #[test]
    fn tool_names_are_plain() {
        let t = Tool::parse("billing/pay_invoice").unwrap();
        assert_eq!((t.upstream(), t.name()), ("billing", "pay_invoice"));
        assert_eq!(t.to_string(), "billing/pay_invoice");
        assert!(Tool::new("billing", "v1.read-all_2").is_ok());
        for bad in [
            "pay invoice",
            "pay/invoice",
            "",
            "x\"y",
            "a\nb",
            "naïve",
            &"t".repeat(129),
        ] {
            assert!(
                matches!(Tool::new("billing", bad), Err(ToolNameError::Tool(_))),
                "{bad:?}"
            );
        }
        for bad in ["Billing", "-b", "", "b/c", &"b".repeat(64)] {
            assert!(
                matches!(Tool::new(bad, "t"), Err(ToolNameError::Upstream(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            Tool::parse("nothing"),
            Err(ToolNameError::Shape(_))
        ));
    }

    #[test]
    fn canonical_form_sorts_keys_and_drops_whitespace() {
        let a = parse(r#"{ "b": [1, {"z": true, "a": null}], "a": "x\u00e9" }"#).unwrap();
        assert_eq!(a.canonical(), r#"{"a":"xé","b":[1,{"a":null,"z":true}]}"#);
        let b = parse(r#"{"a":"xé","b":[1,{"z":true,"a":null}]}"#).unwrap();
        assert_eq!(a.sha256(), b.sha256(), "the same object hashes the same");
        let c = parse(r#"{"a":"xé","b":[{"z":true,"a":null},1]}"#).unwrap();
        assert_ne!(a.sha256(), c.sha256(), "array order counts");
        assert_eq!(
            parse("{}").unwrap().sha256_hex(),
            // SHA-256 of "{}".
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        assert!(
            !format!("{a:?}").contains("xé"),
            "Debug shows the hash only"
        );
    }

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        assert_eq!(
            parse(r#"{"amount": 1, "amount": 1000}"#),
            Err(ArgumentsError::DuplicateKey("amount".into()))
        );
        assert_eq!(
            parse(r#"{"a": [{"k": 1, "k": 2}]}"#),
            Err(ArgumentsError::DuplicateKey("k".into()))
        );
    }

    #[test]
    fn limits_stop_the_parse() {
        let limits = ArgumentLimits {
            max_bytes: 64,
            max_depth: 3,
            max_values: 5,
        };
        assert!(Arguments::parse(r#"{"a": {"b": {"c": 1}}}"#, &limits).is_ok());
        assert_eq!(
            Arguments::parse(r#"{"a": {"b": {"c": {}}}}"#, &limits),
            Err(ArgumentsError::TooDeep(3))
        );
        assert_eq!(
            Arguments::parse(r#"{"a": [1, 2, 3, 4, 5]}"#, &limits),
            Err(ArgumentsError::TooMany(5))
        );
        let long = format!(r#"{{"a": "{}"}}"#, "x".repeat(64));
        assert_eq!(
            Arguments::parse(&long, &limits),
            Err(ArgumentsError::TooLarge(long.len(), 64))
        );
        // A nesting bomb within the byte limit stops at the depth limit,
        // long before serde_json's own recursion limit.
        let bomb = format!("{{\"a\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(parse(&bomb), Err(ArgumentsError::TooDeep(8)));
    }

    #[test]
    fn only_one_object_is_arguments() {
        for bad in ["[]", "1", "\"x\"", "null"] {
            assert_eq!(parse(bad), Err(ArgumentsError::NotAnObject), "{bad}");
        }
        for bad in ["", "{", "{} {}", "{\"a\":}", "{'a':1}"] {
            assert!(
                matches!(parse(bad), Err(ArgumentsError::Malformed(_))),
                "{bad:?}"
            );
        }
    }
}
