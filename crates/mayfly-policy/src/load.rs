//! Loading a policy directory: parse every `*.cedar` file, give each policy
//! its `@id`, check annotations, validate the whole set against the schema,
//! and report every problem as `file:line:col: message`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use cedar_policy::{PolicyId, PolicySet, ValidationMode, Validator};
use miette::Diagnostic;

use crate::{CedarPolicy, Limits};

/// One thing wrong with a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

/// Why a policy set was refused: every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyLoadError {
    /// What is wrong, in file order.
    pub problems: Vec<Problem>,
}

impl fmt::Display for PolicyLoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// 1-based line and column of a byte offset.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}

/// Byte offsets where each policy of a file starts: lines whose first
/// token is `permit` or `forbid`, or their leading annotations.
/// Drops the ` for Mayfly::Action::"name"` part of a validation message,
/// so that a mistake in a policy covering several actions reads once.
fn without_action(message: &str) -> String {
    const MARK: &str = " for Mayfly::Action::\"";
    match message.find(MARK) {
        Some(at) => {
            let rest = &message[at + MARK.len()..];
            let after = rest.find('"').map_or("", |end| &rest[end + 1..]);
            format!("{}{}", &message[..at], without_action(after))
        }
        None => message.to_owned(),
    }
}

fn policy_starts(text: &str) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut pending: Option<usize> = None;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let at = offset + (line.len() - trimmed.len());
        if trimmed.starts_with('@') {
            pending.get_or_insert(at);
        } else if trimmed.starts_with("permit") || trimmed.starts_with("forbid") {
            starts.push(pending.take().unwrap_or(at));
        } else if !trimmed.is_empty() && !trimmed.starts_with("//") {
            pending = None;
        }
        offset += line.len();
    }
    starts
}

/// The file that declares the tools, beside the policies.
const TOOLS_FILE: &str = "tools.toml";

/// Whether `path` is read with the policies: a `*.cedar` file, or the
/// tools' declarations (`tools.toml`).
pub fn is_policy_file(path: &Path) -> bool {
    path.extension().is_some_and(|x| x == "cedar")
        || path.file_name().is_some_and(|n| n == TOOLS_FILE)
}

fn is_tools(file: &str) -> bool {
    std::path::Path::new(file)
        .file_name()
        .is_some_and(|n| n == TOOLS_FILE)
}

const ANNOTATIONS: [&str; 4] = ["id", "max_ttl", "approval", "description"];

impl CedarPolicy {
    /// Loads and validates every `*.cedar` file in `dir`.
    pub fn load_dir(dir: &Path) -> Result<Self, PolicyLoadError> {
        let problem = |message: String| PolicyLoadError {
            problems: vec![Problem {
                file: dir.display().to_string(),
                line: 1,
                column: 1,
                message,
            }],
        };
        let entries = std::fs::read_dir(dir)
            .map_err(|e| problem(format!("cannot read the policy directory: {e}")))?;
        let mut files: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| is_policy_file(p))
            .collect();
        files.sort();
        let mut sources = Vec::new();
        for f in files {
            let text = std::fs::read_to_string(&f)
                .map_err(|e| problem(format!("{}: {e}", f.display())))?;
            sources.push((f.display().to_string(), text));
        }
        if !sources.iter().any(|(f, _)| f.ends_with(".cedar")) {
            return Err(problem("no .cedar policy files".into()));
        }
        Self::from_sources(&sources, &dir.display().to_string())
    }

    /// Parses and validates policies given as (file name, text) pairs;
    /// a file named `tools.toml` declares the tools (see the crate docs).
    pub fn from_sources(
        sources: &[(String, String)],
        source: &str,
    ) -> Result<Self, PolicyLoadError> {
        let mut problems = Vec::new();
        let mut set = PolicySet::new();
        let mut tools = crate::tools::Tools::default();
        for (file, text) in sources.iter().filter(|(f, _)| is_tools(f)) {
            match crate::tools::Tools::parse(text) {
                Ok(t) => tools = t,
                Err(messages) => problems.extend(messages.into_iter().map(|message| Problem {
                    file: file.clone(),
                    line: 1,
                    column: 1,
                    message,
                })),
            }
        }
        // Policy id → (file index, start offset), for locating problems.
        let mut origin: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        let mut limits = HashMap::new();
        for (fi, (file, text)) in sources.iter().enumerate() {
            if is_tools(file) {
                continue;
            }
            let at = |offset: usize, message: String| {
                let (line, column) = position(text, offset);
                Problem {
                    file: file.clone(),
                    line,
                    column,
                    message,
                }
            };
            let parsed = match PolicySet::from_str(text) {
                Ok(p) => p,
                Err(errors) => {
                    for e in errors.iter() {
                        let offset = e
                            .labels()
                            .and_then(|mut l| l.next())
                            .map_or(0, |l| l.offset());
                        problems.push(at(offset, e.to_string()));
                    }
                    continue;
                }
            };
            let starts = policy_starts(text);
            // Cedar numbers a file's policies policy0, policy1, … in order.
            let mut policies: Vec<_> = parsed.policies().collect();
            policies.sort_by_key(|p| {
                p.id()
                    .to_string()
                    .trim_start_matches("policy")
                    .parse::<usize>()
                    .unwrap_or(0)
            });
            for (n, policy) in policies.into_iter().enumerate() {
                let start = starts.get(n).copied().unwrap_or(0);
                let mut limit = Limits::default();
                for (key, value) in policy.annotations() {
                    if !ANNOTATIONS.contains(&key) {
                        problems.push(at(start, format!("unknown annotation @{key} (known: @id, @max_ttl, @approval, @description)")));
                    }
                    if key == "max_ttl" {
                        match humantime::parse_duration(value) {
                            Ok(d) if d.as_secs() >= 1 && d.subsec_nanos() == 0 => {
                                limit.max_ttl = Some(d);
                            }
                            _ => problems.push(at(start, format!("@max_ttl({value:?}) is not a whole number of seconds such as \"90s\" or \"10m\""))),
                        }
                    }
                    if key == "approval" && value == "required" {
                        limit.approval_required = true;
                    } else if key == "approval" && value != "none" {
                        problems.push(at(
                            start,
                            format!("@approval({value:?}) must be \"required\" or \"none\""),
                        ));
                    }
                }
                let Some(id) = policy.annotation("id") else {
                    problems.push(at(start, "policy has no @id(\"…\") annotation".into()));
                    continue;
                };
                if id.is_empty()
                    || !id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
                {
                    problems.push(at(
                        start,
                        format!("@id({id:?}) must be letters, digits, '-', '_', '.' or ':'"),
                    ));
                    continue;
                }
                if let Some((other, _)) = origin.get(id) {
                    let first = &sources[*other].0;
                    problems.push(at(start, format!("@id({id:?}) is already used in {first}")));
                    continue;
                }
                origin.insert(id.to_owned(), (fi, start));
                limits.insert(PolicyId::new(id), limit);
                if let Err(e) = set.add(policy.new_id(PolicyId::new(id))) {
                    problems.push(at(start, e.to_string()));
                }
            }
        }
        if problems.is_empty() {
            let schema = Self::schema_with(&tools).map_err(|e| PolicyLoadError {
                problems: vec![Problem {
                    file: TOOLS_FILE.into(),
                    line: 1,
                    column: 1,
                    message: e.to_string(),
                }],
            })?;
            let result = Validator::new(schema).validate(&set, ValidationMode::Strict);
            let mut seen = BTreeSet::new();
            for e in result.validation_errors() {
                let Some(&(fi, start)) = origin.get(&e.policy_id().to_string()) else {
                    continue;
                };
                let offset = e
                    .labels()
                    .and_then(|mut l| l.next())
                    .map_or(start, |l| l.offset());
                let (file, text) = &sources[fi];
                let (line, column) = position(text, offset);
                // One message per place, not one per action it applies to.
                let mut message = without_action(&e.to_string());
                if let Some(help) = e.help() {
                    message = format!("{message} ({help})");
                }
                if seen.insert((fi, offset, message.clone())) {
                    problems.push(Problem {
                        file: file.clone(),
                        line,
                        column,
                        message,
                    });
                }
            }
        }
        if !problems.is_empty() {
            problems.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
            return Err(PolicyLoadError { problems });
        }
        let slices = crate::slice::Slices::new(&set).map_err(|e| PolicyLoadError {
            problems: vec![Problem {
                file: source.to_owned(),
                line: 1,
                column: 1,
                message: format!("cannot index the policies: {e}"),
            }],
        })?;
        let reads_now = set.policies().any(crate::cache::reads_now);
        Ok(Self {
            set,
            slices,
            source: source.to_owned(),
            limits,
            tools,
            decisions: Default::default(),
            reads_now,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_names_are_dropped_from_messages() {
        assert_eq!(
            without_action(
                "attribute `x` in context for Mayfly::Action::\"issue_token\" not found"
            ),
            "attribute `x` in context not found"
        );
        assert_eq!(without_action("no action here"), "no action here");
    }

    #[test]
    fn positions_and_starts() {
        let text = "// c\n@id(\"a\")\npermit(principal, action, resource);\n\n  forbid(principal, action, resource);\n";
        assert_eq!(position(text, 0), (1, 1));
        assert_eq!(position(text, 5), (2, 1));
        assert_eq!(position(text, 7), (2, 3));
        let starts = policy_starts(text);
        assert_eq!(starts.len(), 2);
        assert_eq!(position(text, starts[0]), (2, 1));
        assert_eq!(position(text, starts[1]), (5, 3));
    }
}
