//! `mayfly policy check DIR`: validates policies as the broker would.

use std::path::Path;

use mayfly_policy::CedarPolicy;

/// Prints the counts of policies and tools, or every problem as `file:line:col: message`.
pub fn check(dir: &Path) -> anyhow::Result<()> {
    match CedarPolicy::load_dir(dir) {
        Ok(p) => {
            let tools = match p.tools() {
                0 => String::new(),
                n => format!(" and {n} tools"),
            };
            println!(
                "{}: {} policies{tools}, valid against the Mayfly schema",
                dir.display(),
                p.len()
            );
            Ok(())
        }
        Err(e) => {
            for p in &e.problems {
                println!("{p}");
            }
            anyhow::bail!("{} problem(s) in {}", e.problems.len(), dir.display())
        }
    }
}
