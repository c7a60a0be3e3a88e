//! The Prometheus text format (version 0.0.4), for scrapers that ask for
//! `text/plain` rather than OpenMetrics, made from the OpenMetrics text the
//! registry encodes. The two differ only where this rewrites:
//! - a counter's `# HELP`/`# TYPE` name its sample (`x_total`), not the
//!   family (`x`); an info family (`x` of `x_info`) is a gauge `x_info`,
//!   `unknown` is `untyped`;
//! - there are no `# UNIT` lines, `_created` samples or `# EOF`.

/// `openmetrics` (as `prometheus_client` encodes it: HELP, TYPE, UNIT,
/// then the samples of each family) in the Prometheus text format.
pub fn from_openmetrics(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // A family's HELP comes before its TYPE, which decides its name.
    let mut help: Option<(&str, &str)> = None;
    let mut kind = "";
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = rest.split_once(' ').or(Some((rest, "")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (family, om_kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            kind = om_kind;
            let (name, classic) = match om_kind {
                "counter" => (format!("{family}_total"), "counter"),
                "info" => (format!("{family}_info"), "gauge"),
                "unknown" => (family.to_owned(), "untyped"),
                other => (family.to_owned(), other),
            };
            if let Some((of, text)) = help.take()
                && of == family
            {
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {classic}\n"));
            continue;
        }
        let sample = line.split(['{', ' ']).next().unwrap_or("");
        if matches!(kind, "counter" | "histogram" | "summary") && sample.ends_with("_created") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::metrics::info::Info;
    use prometheus_client::registry::{Registry, Unit};

    #[test]
    fn rewrites_what_the_formats_name_differently() {
        let mut r = Registry::with_prefix("mayfly");
        let c = Family::<Vec<(String, String)>, Counter>::default();
        c.get_or_create(&vec![("event".into(), "token_issued".into())])
            .inc_by(3);
        r.register("decisions", "Audited decisions, by event", c);
        let g = Gauge::<i64>::default();
        g.set(7);
        r.register("active_leases", "Leases active", g);
        let h = Histogram::new([0.1, 1.0]);
        h.observe(0.5);
        r.register_with_unit("rpc_duration", "Handling time", Unit::Seconds, h);
        r.register("build", "The build", Info::new(vec![("version", "1.2.3")]));
        let mut om = String::new();
        prometheus_client::encoding::text::encode(&mut om, &r).unwrap();
        let classic = from_openmetrics(&om);
        assert_eq!(
            classic,
            "# HELP mayfly_decisions_total Audited decisions, by event.\n\
             # TYPE mayfly_decisions_total counter\n\
             mayfly_decisions_total{event=\"token_issued\"} 3\n\
             # HELP mayfly_active_leases Leases active.\n\
             # TYPE mayfly_active_leases gauge\n\
             mayfly_active_leases 7\n\
             # HELP mayfly_rpc_duration_seconds Handling time.\n\
             # TYPE mayfly_rpc_duration_seconds histogram\n\
             mayfly_rpc_duration_seconds_sum 0.5\n\
             mayfly_rpc_duration_seconds_count 1\n\
             mayfly_rpc_duration_seconds_bucket{le=\"0.1\"} 0\n\
             mayfly_rpc_duration_seconds_bucket{le=\"1.0\"} 1\n\
             mayfly_rpc_duration_seconds_bucket{le=\"+Inf\"} 1\n\
             # HELP mayfly_build_info The build.\n\
             # TYPE mayfly_build_info gauge\n\
             mayfly_build_info{version=\"1.2.3\"} 1\n",
            "from:\n{om}"
        );
    }
}
