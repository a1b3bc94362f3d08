//! docs/backend-authors.md shows exactly the example that tests/minimal.rs
//! compiles and runs against the suite.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[test]
fn guide_shows_the_compiled_example_verbatim() {
    let guide = include_str!("../../../docs/backend-authors.md");
    let (_, example) = include_str!("minimal.rs")
        .split_once("// --- example ---\n")
        .expect("tests/minimal.rs has the example marker");
    let block = format!("```rust\n{example}```\n");
    assert!(
        guide.contains(&block),
        "docs/backend-authors.md must show tests/minimal.rs (below the marker) verbatim in a ```rust block"
    );
}

#[test]
fn guide_lists_every_case() {
    let guide = include_str!("../../../docs/backend-authors.md");
    let names = idem_conformance::Suite::new(idem_conformance::MemoryFactory).names();
    assert!(names.len() > 50);
    for name in names {
        // The `*_cached` variants rerun listed cases with the engine's cache
        // of finished records on: their plain case is listed.
        let name = match name.split_once("_cached::") {
            Some((module, case)) => format!("{module}::{case}"),
            None => name,
        };
        // The regression_* and rule_* families are listed by prefix.
        if name.starts_with("model::regression_") || name.starts_with("model::rule_") {
            continue;
        }
        assert!(
            guide.contains(&format!("| `{name}` |")),
            "the guide's table of cases does not list `{name}`"
        );
    }
}
