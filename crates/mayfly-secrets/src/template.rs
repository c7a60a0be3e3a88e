//! What a scope grants, as a statement template checked when the
//! configuration loads.
//!
//! A template is a `GRANT … TO {role}` statement made only of words,
//! identifiers (plain or double-quoted), numbers and the punctuation a
//! grant needs (`,`, `.`, `(`, `)`, `*`), ending in `TO {role}`. Nothing in
//! it can close the statement, open a string, a comment or a dollar
//! quote, or name the new role anywhere else: the only text that ever
//! reaches the server besides the operator's own words is the role name,
//! quoted as an identifier. The broker's input (a lease id, scopes) never
//! enters a statement at all.

use std::fmt;

use postgres_protocol::escape::escape_identifier;

/// The placeholder for the new role.
const ROLE: &str = "{role}";

/// A checked template.
#[derive(Clone, PartialEq, Eq)]
pub struct Grant {
    /// The statement up to `{role}` (which is always its end).
    head: String,
}

impl fmt::Debug for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{ROLE}", self.head)
    }
}

/// Why a template was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("grant template {template:?}: {reason}")]
pub struct TemplateError {
    template: String,
    reason: String,
}

impl Grant {
    /// Checks `template`.
    pub fn parse(template: &str) -> Result<Self, TemplateError> {
        let refuse = |reason: &str| TemplateError {
            template: template.to_owned(),
            reason: reason.to_owned(),
        };
        let tokens = tokens(template).map_err(|r| refuse(&r))?;
        let words: Vec<&Token> = tokens.iter().collect();
        match words.first() {
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("grant") => {}
            _ => return Err(refuse("it must be a GRANT statement")),
        }
        let roles = words.iter().filter(|t| matches!(t, Token::Role)).count();
        let ends_to_role = matches!(
            words.as_slice(),
            [.., Token::Word(to), Token::Role] if to.eq_ignore_ascii_case("to")
        );
        if roles != 1 || !ends_to_role {
            return Err(refuse(
                "it must end in `TO {role}`, and name {role} nowhere else",
            ));
        }
        let end = template.rfind(ROLE).unwrap_or(template.len());
        Ok(Self {
            head: template[..end].to_owned(),
        })
    }

    /// The statement for `role`, quoted as an identifier.
    pub fn statement(&self, role: &str) -> String {
        format!("{}{}", self.head, escape_identifier(role))
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Token {
    /// A keyword or a plain identifier (letters, digits, `_`, `$` not first).
    Word(String),
    /// A double-quoted identifier.
    Quoted,
    /// A number (e.g. a column list never needs one, but privileges may).
    Number,
    /// `,` `.` `(` `)` `*`
    Punct,
    /// `{role}`
    Role,
}

fn tokens(s: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut chars = s.char_indices().peekable();
    while let Some(&(i, c)) = chars.peek() {
        match c {
            c if c.is_ascii_whitespace() => {
                chars.next();
            }
            ',' | '.' | '(' | ')' | '*' => {
                chars.next();
                out.push(Token::Punct);
            }
            '{' => {
                if !s[i..].starts_with(ROLE) {
                    return Err("`{` starts nothing but {role}".into());
                }
                for _ in 0..ROLE.len() {
                    chars.next();
                }
                out.push(Token::Role);
            }
            '"' => {
                chars.next();
                let mut closed = false;
                let mut empty = true;
                while let Some((_, c)) = chars.next() {
                    if c == '"' {
                        // `""` is a quote inside the identifier.
                        if chars.peek().is_some_and(|&(_, n)| n == '"') {
                            chars.next();
                            empty = false;
                            continue;
                        }
                        closed = true;
                        break;
                    }
                    if c.is_control() {
                        return Err("a quoted identifier holds a control character".into());
                    }
                    empty = false;
                }
                if !closed || empty {
                    return Err("a quoted identifier is not closed, or empty".into());
                }
                out.push(Token::Quoted);
            }
            c if c.is_ascii_digit() => {
                while chars.peek().is_some_and(|&(_, c)| c.is_ascii_digit()) {
                    chars.next();
                }
                out.push(Token::Number);
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let mut word = String::new();
                while let Some(&(_, c)) = chars.peek() {
                    if c.is_ascii_alphanumeric() || c == '_' || c == '$' {
                        word.push(c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push(Token::Word(word));
            }
            ';' => return Err("`;` would end the statement".into()),
            '\'' => return Err("string literals are not allowed".into()),
            '-' | '/' => return Err("comments and operators are not allowed".into()),
            other => return Err(format!("{other:?} is not allowed")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_are_kept_and_the_role_quoted() {
        let g = Grant::parse("GRANT orders_reader TO {role}").unwrap();
        assert_eq!(g.statement("mf_ab"), r#"GRANT orders_reader TO "mf_ab""#);
        let g = Grant::parse(r#"grant select, insert on table public."Orders" to {role}"#).unwrap();
        assert_eq!(
            g.statement(r#"we"ird"#),
            r#"grant select, insert on table public."Orders" to "we""ird""#
        );
        Grant::parse("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}").unwrap();
        Grant::parse("GRANT USAGE ON SCHEMA \"a\"\"b\" TO {role}").unwrap();
    }

    #[test]
    fn anything_that_could_inject_is_refused() {
        for bad in [
            "GRANT x TO {role}; DROP TABLE orders",
            "GRANT x TO {role}; --",
            "GRANT x TO {role} -- comment",
            "GRANT x /* c */ TO {role}",
            "GRANT x TO {role}, {role}",
            "GRANT {role} TO {role}",
            "GRANT x TO public",
            "GRANT x TO {role} WITH ADMIN OPTION",
            "ALTER ROLE {role} SUPERUSER",
            "DROP TABLE orders",
            "GRANT 'x' TO {role}",
            "GRANT $$x$$ TO {role}",
            "GRANT \"x TO {role}",
            "GRANT \"\" TO {role}",
            "GRANT x TO {rolex}",
            "GRANT x TO {ROLE}",
            "GRANT x\\ TO {role}",
            "GRANT x TO \"{role}\"",
            "",
        ] {
            assert!(Grant::parse(bad).is_err(), "accepted {bad:?}");
        }
    }
}
