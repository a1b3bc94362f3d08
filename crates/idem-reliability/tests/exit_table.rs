//! docs/reliability.md, "Every way a request ends", and the exit matrix
//! (`tests/exits.rs`) name the same rows: every `exits::<row>` the table
//! cites is a case, and every case is cited.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;

fn names(text: &str) -> BTreeSet<String> {
    text.match_indices("exits::")
        .map(|(at, _)| {
            text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect::<String>()
        })
        .filter(|n| n.len() > "exits::".len())
        .collect()
}

#[test]
fn the_exit_table_and_the_exit_matrix_name_the_same_rows() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let doc = std::fs::read_to_string(format!("{root}/docs/reliability.md")).unwrap();
    let start = doc
        .find("## Every way a request ends")
        .expect("docs/reliability.md has the exit table");
    let end = doc[start + 3..]
        .find("\n## ")
        .map_or(doc.len(), |i| start + 3 + i);
    let cited = names(&doc[start..end]);
    let source =
        std::fs::read_to_string(format!("{}/tests/exits.rs", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let cases: BTreeSet<String> = source
        .match_indices("\"exits::")
        .map(|(at, _)| {
            source[at + 1..]
                .chars()
                .take_while(|c| *c != '"')
                .collect::<String>()
        })
        .collect();
    assert!(cases.len() >= 20, "the matrix has {} rows", cases.len());
    let missing: Vec<_> = cited.difference(&cases).collect();
    assert!(
        missing.is_empty(),
        "the table cites rows that are not cases: {missing:?}"
    );
    let uncited: Vec<_> = cases.difference(&cited).collect();
    assert!(
        uncited.is_empty(),
        "cases the table does not cite: {uncited:?}"
    );
}
