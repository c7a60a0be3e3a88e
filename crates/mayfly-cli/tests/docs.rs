//! The README and the guides under `docs/guides/` are run against this
//! build, so what they show is what the binary does.
//!
//! Each file is walked in its own bash session, in a fresh temporary
//! directory, with this build's `mayfly` (and the `downstream-api`
//! example) first on the PATH, then the directory of the Python
//! interpreter from `pyenv`. `deploy/`, `examples/`, `proto/` and `sdk/`
//! are linked into the directory, so commands read as they do from a
//! clone. Every `$ command` of a ```` ```console ```` block runs in order
//! and its output is compared with the documented one, with snapbox's
//! wildcards: `[..]` for part of a line, `...` on a line of its own for any
//! lines. A command that fails must have documented output (its error).
//! `cargo run --release -p mayfly-cli --` and `cargo run -p downstream-api`
//! are mapped to the built binaries. ```` ```console,ignore ```` blocks are
//! not run (the reason is said next to each in the text).
//!
//! A file must stop what it starts: a process left in its session's
//! process group, or one of the dev ports still taken, fails the walk.
//! The files use fixed ports, so one test walks them one after another.
//! `MAYFLY_DOCS=guides/mcp.md` (a path under `docs/`, or `README.md`)
//! walks only the files whose path ends so.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "docs/markdown.rs"]
mod markdown;
mod pyenv;
#[path = "docs/session.rs"]
mod session;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use markdown::Block;
use session::Session;
use snapbox::{Assert, Data};

/// The ports the dev setup and the examples listen on.
const DEV_PORTS: [u16; 9] = [6390, 8710, 8711, 8720, 8721, 8730, 8790, 8792, 8793];

/// The repository's root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// README.md, then the guides in name order.
fn documents() -> Vec<PathBuf> {
    let mut guides: Vec<PathBuf> = std::fs::read_dir(root().join("docs/guides"))
        .map(|dir| {
            dir.map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "md"))
                .collect()
        })
        .unwrap_or_default();
    guides.sort();
    let mut all = vec![root().join("README.md")];
    all.extend(guides);
    let only = std::env::var("MAYFLY_DOCS").ok();
    all.retain(|p| only.as_ref().is_none_or(|o| p.ends_with(o)));
    all
}

/// The `downstream-api` example's binary, built beside `mayfly` if it is
/// not there yet.
fn downstream_api() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_mayfly"))
        .with_file_name(format!("downstream-api{}", std::env::consts::EXE_SUFFIX));
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "downstream-api"])
            .current_dir(root())
            .status()
            .expect("cargo runs");
        assert!(status.success(), "cargo build -p downstream-api failed");
    }
    bin
}

/// The PATH of a session: the built binaries (the example API only if
/// `with_api`, as it is built on demand), the Python interpreter's
/// directory, then the caller's PATH.
fn session_path(with_api: bool) -> String {
    let mayfly = PathBuf::from(env!("CARGO_BIN_EXE_mayfly"));
    let python = pyenv::python();
    // A bare name (`python3`) is found on the PATH as it is.
    let python_dir = python
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map(Path::to_path_buf);
    let mut dirs = vec![mayfly.parent().unwrap().to_path_buf()];
    if with_api {
        dirs.push(downstream_api().parent().unwrap().to_path_buf());
    }
    dirs.extend(python_dir);
    dirs.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    dirs.dedup();
    std::env::join_paths(dirs)
        .unwrap()
        .into_string()
        .expect("a UTF-8 PATH")
}

/// The command as the session runs it: `cargo run` of a binary this test
/// has built becomes the binary.
fn mapped(command: &str) -> String {
    command
        .replace("cargo run --release -p mayfly-cli --", "mayfly")
        .replace("cargo run -p mayfly-cli --", "mayfly")
        .replace("cargo run --release -p downstream-api --", "downstream-api")
        .replace("cargo run --release -p downstream-api", "downstream-api")
        .replace("cargo run -p downstream-api --", "downstream-api")
        .replace("cargo run -p downstream-api", "downstream-api")
}

/// Those of `ports` something holds now.
fn taken_ports(ports: &[u16]) -> Vec<u16> {
    ports
        .iter()
        .copied()
        .filter(|&p| TcpListener::bind(("127.0.0.1", p)).is_err())
        .collect()
}

/// Walks one file, which must leave `ports` free; `Err` lists what did
/// not match.
fn walk(doc: &Path, path: &str, ports: &[u16]) -> Result<(), String> {
    let name = doc
        .strip_prefix(root())
        .unwrap_or(doc)
        .display()
        .to_string();
    let text = std::fs::read_to_string(doc).unwrap();
    let blocks = markdown::blocks(&text).map_err(|e| format!("{name}: {e}"))?;
    let dir = tempfile::tempdir().unwrap();
    for link in ["deploy", "examples", "proto", "sdk"] {
        std::os::unix::fs::symlink(root().join(link), dir.path().join(link)).unwrap();
    }
    let mut session = Session::start(dir.path(), path);
    let group = session.group();
    let mut failures = Vec::new();
    // Backslashes are content here (JSON escapes), not Windows paths.
    let assert = Assert::new()
        .action(snapbox::assert::Action::Verify)
        .normalize_paths(false);
    'walk: for block in &blocks {
        match block {
            Block::File {
                name: file,
                content,
            } => {
                let to = dir.path().join(file);
                std::fs::create_dir_all(to.parent().unwrap()).unwrap();
                std::fs::write(&to, content).unwrap();
            }
            Block::Console(steps) => {
                for step in steps {
                    let ran = match session.run(&mapped(&step.command)) {
                        Ok(ran) => ran,
                        Err(e) => {
                            failures.push(format!("{name}:{}: `{}`: {e}", step.line, step.command));
                            break 'walk;
                        }
                    };
                    let label = format!("{name}:{}: `{}`", step.line, step.command);
                    // A terminal shows an unterminated last line as a line;
                    // so does the document.
                    let mut output = ran.output;
                    if !output.is_empty() && !output.ends_with('\n') {
                        output.push('\n');
                    }
                    if let Err(e) = assert.try_eq(
                        Some(&label),
                        Data::text(output),
                        Data::text(step.expected.clone()),
                    ) {
                        failures.push(format!("{label}: output differs\n{e}"));
                    } else if ran.status != 0 && step.expected.is_empty() {
                        failures.push(format!(
                            "{label}: exited {} where the document shows no error",
                            ran.status
                        ));
                    }
                }
            }
        }
    }
    session.finish();
    let left = session::survivors(group);
    if !left.is_empty() {
        session::kill_group(group);
        failures.push(format!(
            "{name} leaves processes running (a guide stops what it starts):\n{}",
            left.join("\n")
        ));
    }
    let left = taken_ports(ports);
    if !left.is_empty() {
        failures.push(format!("{name} leaves ports {left:?} taken"));
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n\n"))
    }
}

#[test]
fn the_readme_and_every_guide_show_what_the_binary_does() {
    let busy = taken_ports(&DEV_PORTS);
    assert!(
        busy.is_empty(),
        "the docs use ports {DEV_PORTS:?}; {busy:?} are taken: stop what holds them"
    );
    let docs = documents();
    assert!(!docs.is_empty(), "no document matches MAYFLY_DOCS");
    let failures: Vec<String> = docs
        .iter()
        .filter_map(|doc| {
            let text = std::fs::read_to_string(doc).unwrap();
            let path = session_path(text.contains("cargo run -p downstream-api"));
            walk(doc, &path, &DEV_PORTS).err()
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn a_wrong_output_is_caught_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("bad.md");
    std::fs::write(
        &doc,
        "```console\n$ echo hello\nhello\n$ echo one; echo two\nthree\n$ false\n```\n",
    )
    .unwrap();
    let err = walk(&doc, &std::env::var("PATH").unwrap(), &[]).unwrap_err();
    assert!(
        err.contains("`echo one; echo two`: output differs"),
        "{err}"
    );
    assert!(err.contains("`false`: exited 1"), "{err}");
    assert!(!err.contains("`echo hello`"), "{err}");
}

#[test]
fn wildcards_match_ids_and_lines() {
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("ok.md");
    std::fs::write(
        &doc,
        "```console\n$ X=$(echo abc); printf 'id %s\\na\\nb\\nend\\n' $X\nid [..]\n...\nend\n\
         $ echo $X\nabc\n```\n```text file=f.txt\nfrom a block\n```\n\
         ```console\n$ cat f.txt\nfrom a block\n```\n",
    )
    .unwrap();
    walk(&doc, &std::env::var("PATH").unwrap(), &[]).unwrap();
}

#[test]
fn errors_show_beside_output_and_the_status_carries_over() {
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("status.md");
    std::fs::write(
        &doc,
        "```console\n$ sh -c 'echo out; echo err >&2; exit 3'\nout\nerr\n$ echo $?\n3\n```\n",
    )
    .unwrap();
    walk(&doc, &std::env::var("PATH").unwrap(), &[]).unwrap();
}

#[test]
fn a_process_left_running_is_caught_and_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("leak.md");
    std::fs::write(&doc, "```console\n$ sleep 600 &\n```\n").unwrap();
    let err = walk(&doc, &std::env::var("PATH").unwrap(), &[]).unwrap_err();
    assert!(err.contains("leaves processes running"), "{err}");
    assert!(err.contains("sleep 600"), "{err}");
}
