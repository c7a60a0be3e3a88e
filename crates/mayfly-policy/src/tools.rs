//! The tools policies decide calls to, declared in the policy directory's
//! `tools.toml`: one table per tool, `[<upstream>.<tool>]`, naming the
//! type of each argument.
//!
//! ```toml
//! [billing.pay_invoice]
//! invoice_id = "string"
//! amount = "decimal"
//! note = "string?"        # optional: policies test it with `has`
//! ```
//!
//! Each tool becomes a Cedar action in the group `call_tool`
//! (`Mayfly::Action::"billing/pay_invoice"`), whose context holds its
//! arguments typed as declared, so strict validation checks every policy
//! that reads them. A call to a tool not declared, with an argument not
//! declared, without a required one, or with one of another type is
//! denied before Cedar is asked.
//!
//! Types: `string`, `long` (a JSON integer), `bool`, `decimal` (a JSON
//! number with at most four decimals, Cedar's `decimal`), `set<string>`,
//! `set<long>`, and `json` (any JSON value, as its canonical text).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use cedar_policy::RestrictedExpression;
use mayfly_core::{Arguments, Tool, canonical_json};
use serde_json::Value;

/// What an argument may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    String,
    Long,
    Bool,
    Decimal,
    StringSet,
    LongSet,
    Json,
}

impl Kind {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "string" => Self::String,
            "long" => Self::Long,
            "bool" => Self::Bool,
            "decimal" => Self::Decimal,
            "set<string>" => Self::StringSet,
            "set<long>" => Self::LongSet,
            "json" => Self::Json,
            _ => return None,
        })
    }

    /// Its Cedar schema type.
    fn cedar(self) -> &'static str {
        match self {
            Self::String | Self::Json => "String",
            Self::Long => "Long",
            Self::Bool => "Bool",
            Self::Decimal => "decimal",
            Self::StringSet => "Set<String>",
            Self::LongSet => "Set<Long>",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::String => "a string",
            Self::Long => "an integer",
            Self::Bool => "a boolean",
            Self::Decimal => "a number with at most four decimals",
            Self::StringSet => "an array of strings",
            Self::LongSet => "an array of integers",
            Self::Json => "JSON",
        }
    }

    /// `v` as Cedar gets it, if it is of this kind.
    fn value(self, v: &Value) -> Option<RestrictedExpression> {
        Some(match (self, v) {
            (Self::String, Value::String(s)) => RestrictedExpression::new_string(s.clone()),
            (Self::Long, Value::Number(n)) => RestrictedExpression::new_long(n.as_i64()?),
            (Self::Bool, Value::Bool(b)) => RestrictedExpression::new_bool(*b),
            (Self::Decimal, Value::Number(n)) => RestrictedExpression::new_decimal(decimal(n)?),
            (Self::StringSet, Value::Array(items)) => RestrictedExpression::new_set(
                items
                    .iter()
                    .map(|i| {
                        i.as_str()
                            .map(|s| RestrictedExpression::new_string(s.to_owned()))
                    })
                    .collect::<Option<Vec<_>>>()?,
            ),
            (Self::LongSet, Value::Array(items)) => RestrictedExpression::new_set(
                items
                    .iter()
                    .map(|i| i.as_i64().map(RestrictedExpression::new_long))
                    .collect::<Option<Vec<_>>>()?,
            ),
            (Self::Json, v) => RestrictedExpression::new_string(canonical_json(v)),
            _ => return None,
        })
    }
}

/// A JSON number as Cedar decimal text (`12.5` → `"12.5"`, `3` →
/// `"3.0"`), if it has at most four decimals and fits.
fn decimal(n: &serde_json::Number) -> Option<String> {
    let text = n.to_string();
    if text.contains(['e', 'E']) {
        return None;
    }
    let (whole, frac) = text.split_once('.').unwrap_or((&text, "0"));
    if frac.is_empty() || frac.len() > 4 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Cedar's decimal is an i64 of ten-thousandths.
    let digits = whole.trim_start_matches('-');
    if digits.is_empty() || digits.len() > 15 {
        return None;
    }
    Some(format!("{whole}.{frac}"))
}

/// One declared argument.
#[derive(Debug, Clone, Copy)]
struct Declared {
    kind: Kind,
    optional: bool,
}

/// The tools of `tools.toml`, each with its arguments.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tools {
    by_tool: BTreeMap<Tool, BTreeMap<String, Declared>>,
}

/// Why a call's arguments could not be given to policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Unfit {
    #[error("tool {0} is not declared in the policies' tools.toml")]
    Undeclared(String),
    #[error("argument {0:?} of {1} is not declared in tools.toml")]
    Unknown(String, String),
    #[error("argument {0:?} of {1} is missing")]
    Missing(String, String),
    #[error("argument {0:?} of {1} must be {2}")]
    Type(String, String, &'static str),
}

/// An argument name policies can read: 1–64 of `A-Z a-z 0-9 _ -`.
fn plain_argument(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Tools {
    /// Parses `tools.toml`; every problem is a message.
    pub(crate) fn parse(text: &str) -> Result<Self, Vec<String>> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| vec![e.to_string()])?;
        let mut problems = Vec::new();
        let mut by_tool = BTreeMap::new();
        for (upstream, tools) in &table {
            let Some(tools) = tools.as_table() else {
                problems.push(format!("[{upstream}] must be a table of tools"));
                continue;
            };
            for (name, args) in tools {
                let tool = match Tool::new(upstream, name) {
                    Ok(t) => t,
                    Err(e) => {
                        problems.push(e.to_string());
                        continue;
                    }
                };
                let Some(args) = args.as_table() else {
                    problems.push(format!("[{tool}] must be a table of arguments"));
                    continue;
                };
                let mut declared = BTreeMap::new();
                for (arg, ty) in args {
                    if !plain_argument(arg) {
                        problems.push(format!(
                            "{tool}: argument {arg:?} is not 1-64 of A-Z, a-z, 0-9, '_', '-'"
                        ));
                        continue;
                    }
                    let text = ty.as_str().unwrap_or("");
                    let (kind, optional) = match text.strip_suffix('?') {
                        Some(k) => (k, true),
                        None => (text, false),
                    };
                    match Kind::parse(kind) {
                        Some(kind) => {
                            declared.insert(arg.clone(), Declared { kind, optional });
                        }
                        None => problems.push(format!(
                            "{tool}: argument {arg:?} has type {ty}; use string, long, bool, \
                             decimal, set<string>, set<long> or json, with '?' if optional"
                        )),
                    }
                }
                by_tool.insert(tool, declared);
            }
        }
        if problems.is_empty() {
            Ok(Self { by_tool })
        } else {
            Err(problems)
        }
    }

    /// Whether `tool` is declared.
    pub(crate) fn declares(&self, tool: &Tool) -> bool {
        self.by_tool.contains_key(tool)
    }

    /// How many tools are declared.
    pub(crate) fn len(&self) -> usize {
        self.by_tool.len()
    }

    /// The Cedar schema of the tools' actions, added to [`crate::SCHEMA`].
    pub(crate) fn schema(&self) -> String {
        let mut out = String::from("namespace Mayfly {\n");
        for (tool, args) in &self.by_tool {
            let _ = write!(
                out,
                "  action \"{tool}\" in [call_tool] appliesTo {{\n    principal: [Agent],\n    \
                 resource: [Tool],\n    context: {{\n      task: Task,\n      scopes: Set<String>,\n      \
                 scope_prefixes: Set<String>,\n      binding: String,\n      now: Long,\n      \
                 method: String,\n      route: String,\n      arguments: {{"
            );
            for (i, (name, d)) in args.iter().enumerate() {
                let sep = if i == 0 { "" } else { "," };
                let opt = if d.optional { "?" } else { "" };
                let _ = write!(out, "{sep} \"{name}\"{opt}: {}", d.kind.cedar());
            }
            out.push_str(" },\n    },\n  };\n");
        }
        out.push_str("}\n");
        out
    }

    /// `arguments` as the Cedar record `context.arguments` of `tool`.
    pub(crate) fn arguments(
        &self,
        tool: &Tool,
        arguments: &Arguments,
    ) -> Result<RestrictedExpression, Unfit> {
        let declared = self
            .by_tool
            .get(tool)
            .ok_or_else(|| Unfit::Undeclared(tool.to_string()))?;
        let given = arguments.value();
        if let Some(unknown) = given.keys().find(|k| !declared.contains_key(*k)) {
            return Err(Unfit::Unknown(unknown.clone(), tool.to_string()));
        }
        let mut fields = Vec::with_capacity(given.len());
        for (name, d) in declared {
            match given.get(name) {
                // A JSON null is an absent optional argument.
                None | Some(Value::Null) if d.optional => {}
                None => return Err(Unfit::Missing(name.clone(), tool.to_string())),
                Some(v) => {
                    let value = d.kind.value(v).ok_or_else(|| {
                        Unfit::Type(name.clone(), tool.to_string(), d.kind.name())
                    })?;
                    fields.push((name.clone(), value));
                }
            }
        }
        RestrictedExpression::new_record(fields).map_err(|_| Unfit::Undeclared(tool.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_cedar_text_or_refused() {
        let n = |s: &str| serde_json::from_str::<serde_json::Number>(s).unwrap();
        assert_eq!(decimal(&n("12.5")).as_deref(), Some("12.5"));
        assert_eq!(decimal(&n("3")).as_deref(), Some("3.0"));
        assert_eq!(decimal(&n("-0.0001")).as_deref(), Some("-0.0001"));
        assert_eq!(decimal(&n("1.00001")), None);
        // serde_json reads an exponent as a float, written out plainly.
        assert_eq!(decimal(&n("1e3")).as_deref(), Some("1000.0"));
        assert_eq!(decimal(&n("1e300")), None);
        assert_eq!(decimal(&n("1234567890123456")), None);
    }

    #[test]
    fn declarations_are_checked() {
        let errs = Tools::parse(
            "[billing.pay_invoice]\namount = \"money\"\n\"bad key\" = \"string\"\n[Billing.x]\n",
        )
        .unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs.iter().any(|e| e.contains("money")), "{errs:?}");
        assert!(errs.iter().any(|e| e.contains("bad key")), "{errs:?}");
        assert!(errs.iter().any(|e| e.contains("Billing")), "{errs:?}");
    }
}
