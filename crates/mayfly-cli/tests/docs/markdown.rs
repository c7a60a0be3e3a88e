//! Reads the fenced blocks of a markdown file that the docs test acts on.
//!
//! - ```` ```console ```` blocks are sessions: each `$ command` (continued
//!   by a trailing `\`, or by a here-document up to its terminator) is run,
//!   and the lines after it, up to the next `$ `, are its documented
//!   output;
//! - ```` ```console,ignore ```` blocks are shown to the reader and never run;
//! - a block whose info string holds `file=NAME` (```` ```python file=agent.py ````)
//!   is written to `NAME` in the session's directory when the walk reaches
//!   it, so the commands after it can use it;
//! - every other block (`sh`, `toml`, `rust`, …) is prose.

/// One thing the docs test does, in document order.
#[derive(Debug)]
pub enum Block {
    /// A console session's commands, run in order.
    Console(Vec<Step>),
    /// A file to write before going on.
    File {
        /// The path, relative to the session's directory.
        name: String,
        /// The block's text.
        content: String,
    },
}

/// One `$ command` and what the document says it prints.
#[derive(Debug)]
pub struct Step {
    /// The markdown line the command starts on (1-based), for messages.
    pub line: usize,
    /// The command, continuation lines and here-documents included.
    pub command: String,
    /// The documented output, with snapbox's `[..]` and `...` wildcards.
    pub expected: String,
}

/// The blocks of `text` the docs test acts on, in order; `Err` names a
/// block it cannot read (an unterminated fence, a console block whose
/// first line is not a command, a here-document without its end).
pub fn blocks(text: &str) -> Result<Vec<Block>, String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(info) = lines[i].strip_prefix("```") else {
            i += 1;
            continue;
        };
        let open = i + 1;
        let end = (i + 1..lines.len())
            .find(|&j| lines[j].trim_end() == "```")
            .ok_or_else(|| format!("line {open}: a fenced block that never ends"))?;
        let body = &lines[i + 1..end];
        let mut words = info.split(|c: char| c == ',' || c.is_whitespace());
        let lang = words.next().unwrap_or("");
        let attrs: Vec<&str> = words.filter(|w| !w.is_empty()).collect();
        if let Some(name) = attrs.iter().find_map(|a| a.strip_prefix("file=")) {
            let mut content = body.join("\n");
            content.push('\n');
            out.push(Block::File {
                name: name.to_owned(),
                content,
            });
        } else if lang == "console" && !attrs.contains(&"ignore") {
            out.push(Block::Console(steps(body, open + 1)?));
        }
        i = end + 1;
    }
    Ok(out)
}

/// Splits a console block's lines (the first being markdown line
/// `first_line`) into commands and their documented output.
fn steps(body: &[&str], first_line: usize) -> Result<Vec<Step>, String> {
    let mut steps: Vec<Step> = Vec::new();
    let mut i = 0;
    while i < body.len() {
        let line = first_line + i;
        let Some(first) = body[i].strip_prefix("$ ") else {
            let Some(step) = steps.last_mut() else {
                return Err(format!("line {line}: a console block must begin with `$ `"));
            };
            step.expected.push_str(body[i]);
            step.expected.push('\n');
            i += 1;
            continue;
        };
        let mut command = first.to_owned();
        i += 1;
        // Continuation lines: a trailing backslash carries on.
        while command.ends_with('\\') && i < body.len() {
            command.push('\n');
            command.push_str(body[i]);
            i += 1;
        }
        // A here-document runs up to its terminator.
        if let Some(word) = heredoc_terminator(&command) {
            loop {
                let Some(next) = body.get(i) else {
                    return Err(format!(
                        "line {line}: here-document without its `{word}` line"
                    ));
                };
                command.push('\n');
                command.push_str(next);
                i += 1;
                if next.trim_end() == word {
                    break;
                }
            }
        }
        steps.push(Step {
            line,
            command,
            expected: String::new(),
        });
    }
    Ok(steps)
}

/// The terminator of a here-document the command opens (`<<'EOF'`,
/// `<<"EOF"` or `<<EOF`), if it opens one.
fn heredoc_terminator(command: &str) -> Option<String> {
    let at = command.find("<<")?;
    let rest = command[at + 2..].trim_start_matches('-').trim_start();
    let word: String = rest
        .trim_start_matches(['\'', '"'])
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    (!word.is_empty()).then_some(word)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_outputs_files_and_ignored_blocks() {
        let text = "intro\n```console\n$ echo a \\\n  b\na b\n$ true\n```\n\
                    ```console,ignore\n$ cargo install x\n```\n\
                    ```toml file=x.toml\nk = 1\n```\n```sh\nls\n```\n\
                    ```console\n$ cat <<'EOF'\nhi\nEOF\nhi\n```\n";
        let blocks = blocks(text).unwrap();
        assert_eq!(blocks.len(), 3, "{blocks:?}");
        let Block::Console(steps) = &blocks[0] else {
            panic!()
        };
        assert_eq!(steps[0].command, "echo a \\\n  b");
        assert_eq!(steps[0].expected, "a b\n");
        assert_eq!(steps[0].line, 3);
        assert_eq!(steps[1].expected, "");
        let Block::File { name, content } = &blocks[1] else {
            panic!()
        };
        assert_eq!((name.as_str(), content.as_str()), ("x.toml", "k = 1\n"));
        let Block::Console(steps) = &blocks[2] else {
            panic!()
        };
        assert_eq!(steps[0].command, "cat <<'EOF'\nhi\nEOF");
        assert_eq!(steps[0].expected, "hi\n");
    }

    #[test]
    fn unreadable_blocks_are_named() {
        assert!(
            blocks("```console\n$ x\n")
                .unwrap_err()
                .contains("never ends")
        );
        assert!(
            blocks("```console\nout\n```\n")
                .unwrap_err()
                .contains("must begin")
        );
        assert!(
            blocks("```console\n$ cat <<EOF\nx\n```\n")
                .unwrap_err()
                .contains("EOF")
        );
    }
}
