//! The verdicts of a run: [`Verdict`] per case, [`Report`] per backend.

/// How one case of a [`Report`] (or one trial of a
/// [`Runner`](crate::runner::Runner)) ended.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// It ran and every assertion held.
    Passed,
    /// It failed; the message says which assertion and why.
    Failed(String),
    /// It did not run: the backend was unreachable (never counted as
    /// passed).
    Ignored(String),
    /// It does not apply to the backend's capabilities; the reason says why.
    /// Not registered as a test by [`Suite::run`](crate::Suite::run).
    NotApplicable(String),
}

/// The verdict of one case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaseReport {
    /// The case's name, without the backend prefix (`store::insert_on_absent`).
    pub name: String,
    /// How it ended.
    pub verdict: Verdict,
}

/// The per-case results of [`Suite::report`](crate::Suite::report), in case order.
#[derive(Clone, Debug)]
pub struct Report {
    /// The backend's name.
    pub backend: &'static str,
    /// One entry per case.
    pub cases: Vec<CaseReport>,
}

impl Report {
    fn names(&self, pick: impl Fn(&Verdict) -> bool) -> Vec<&str> {
        self.cases
            .iter()
            .filter(|c| pick(&c.verdict))
            .map(|c| c.name.as_str())
            .collect()
    }
    /// The names of the cases that passed.
    pub fn passed(&self) -> Vec<&str> {
        self.names(|v| matches!(v, Verdict::Passed))
    }
    /// The names of the cases that failed.
    pub fn failed(&self) -> Vec<&str> {
        self.names(|v| matches!(v, Verdict::Failed(_)))
    }
    /// The names of the cases that were ignored (backend unreachable).
    pub fn ignored(&self) -> Vec<&str> {
        self.names(|v| matches!(v, Verdict::Ignored(_)))
    }
    /// The names of the cases that do not apply to the backend.
    pub fn not_applicable(&self) -> Vec<&str> {
        self.names(|v| matches!(v, Verdict::NotApplicable(_)))
    }
    /// The verdict of the case named `name`.
    pub fn verdict(&self, name: &str) -> Option<&Verdict> {
        self.cases
            .iter()
            .find(|c| c.name == name)
            .map(|c| &c.verdict)
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for case in &self.cases {
            match &case.verdict {
                Verdict::Passed => writeln!(f, "{}::{} ... ok", self.backend, case.name)?,
                Verdict::Ignored(why) => {
                    writeln!(f, "{}::{} ... ignored ({why})", self.backend, case.name)?;
                }
                Verdict::NotApplicable(why) => {
                    writeln!(
                        f,
                        "{}::{} ... does not apply ({why})",
                        self.backend, case.name
                    )?;
                }
                Verdict::Failed(why) => {
                    writeln!(f, "{}::{} ... FAILED: {why}", self.backend, case.name)?;
                }
            }
        }
        Ok(())
    }
}
