//! Reading the KTAP the test kernel prints (see kernel/src/ktest.rs).

/// Result of one numbered test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// `ok N name`.
    Pass,
    /// `ok N name # SKIP reason`.
    Skip(String),
    /// `not ok N name`, with the diagnostic lines printed for it.
    Fail(Vec<String>),
}

/// One test's line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestLine {
    /// 1-based number.
    pub number: usize,
    /// Name.
    pub name: String,
    /// Outcome.
    pub status: Status,
}

/// What one boot's serial output says.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The plan (`1..N`).
    pub plan: Option<usize>,
    /// Results in order.
    pub results: Vec<TestLine>,
    /// The last `# running: NAME` not followed by its result.
    pub running: Option<String>,
}

/// Parses serial output (tolerates log lines and partial last lines).
pub fn parse(text: &str) -> Parsed {
    let mut p = Parsed::default();
    let mut diag: Vec<String> = Vec::new();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(plan) = line.strip_prefix("1..") {
            p.plan = plan.trim().parse().ok();
        } else if let Some(name) = line.strip_prefix("# running: ") {
            p.running = Some(name.trim().to_string());
            diag.clear();
        } else if let Some(rest) = line.strip_prefix("not ok ") {
            if let Some((n, name)) = number_name(rest) {
                p.results.push(TestLine {
                    number: n,
                    name: name.clone(),
                    status: Status::Fail(std::mem::take(&mut diag)),
                });
                p.running = None;
            }
        } else if let Some(rest) = line.strip_prefix("ok ") {
            if let Some((n, name)) = number_name(rest) {
                let status = match name.split_once(" # SKIP") {
                    Some((_, why)) => Status::Skip(why.trim().to_string()),
                    None => Status::Pass,
                };
                let name = name.split(" # ").next().unwrap_or("").to_string();
                p.results.push(TestLine { number: n, name, status });
                p.running = None;
                diag.clear();
            }
        } else if line.starts_with("# ") && p.running.is_some() {
            diag.push(line[2..].to_string());
        }
    }
    p
}

fn number_name(rest: &str) -> Option<(usize, String)> {
    let (n, name) = rest.split_once(' ')?;
    Some((n.parse().ok()?, name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_results_diagnostics_and_hangs() {
        let text = "[ 0.1] INFO boot\nKTAP version 1\n# config: intel\n1..4\n# running: a\nok 1 a\n# running: b\n\
                    # b: x != y\nnot ok 2 b\n# running: c\nok 3 c # SKIP needs amd\n# running: d\n";
        let p = parse(text);
        assert_eq!(p.plan, Some(4));
        assert_eq!(p.results.len(), 3);
        assert_eq!(p.results[1].status, Status::Fail(vec!["b: x != y".into()]));
        assert_eq!(p.results[2], TestLine { number: 3, name: "c".into(), status: Status::Skip("needs amd".into()) });
        assert_eq!(p.running.as_deref(), Some("d"));
    }
}
