//! docs/http-contract.md lists every problem type the layer can answer with.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use idem_tower::ProblemType;

#[test]
fn the_client_contract_lists_every_problem_type() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/http-contract.md");
    let doc = std::fs::read_to_string(path).unwrap();
    for kind in ProblemType::ALL {
        let row = format!("| `{}` | {} ", kind.uri(), kind.status().as_u16());
        assert!(
            doc.contains(&row),
            "docs/http-contract.md lacks the row {row:?}"
        );
    }
}
