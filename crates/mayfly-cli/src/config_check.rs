//! `mayfly config check FILE`: everything `serve` would load, checked
//! without serving (`mayfly_broker::check`), a line per part.

use std::path::Path;

use serde_json::json;

/// Prints a line per part (`ok` or `FAIL`, the part, what was found or is
/// wrong), or with `json` a list; fails if any part failed.
pub async fn run(file: &Path, reach_store: bool, as_json: bool) -> anyhow::Result<()> {
    let findings = mayfly_broker::check::check(file, reach_store).await;
    let failed = findings.iter().filter(|f| f.outcome.is_err()).count();
    if as_json {
        let list: Vec<_> = findings
            .iter()
            .map(|f| match &f.outcome {
                Ok(detail) => json!({"part": f.part, "ok": true, "detail": detail}),
                Err(problem) => {
                    json!({"part": f.part, "ok": false, "problem": problem.to_string()})
                }
            })
            .collect();
        crate::output::print_json(&json!(list));
    } else {
        for f in &findings {
            match &f.outcome {
                Ok(detail) => println!("ok    {}: {detail}", f.part),
                Err(problem) => println!("FAIL  {}: {problem}", f.part),
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} problem(s) in {}", file.display());
    }
    Ok(())
}
