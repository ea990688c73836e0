//! The Markdown tables generated from [`KEYS`]: the configuration reference and the
//! migration table.

use super::schema::Origin;
use super::KEYS;

/// The Markdown reference table of every config key, generated from [`KEYS`]. docs/configuration.md
/// holds a copy between `<!-- config-table:start -->` and `<!-- config-table:end -->`;
/// `testflinger-agent check-config --reference-table` prints it.
pub fn reference_table_markdown() -> String {
    let mut out =
        String::from("| Key | Type | Default | From | Meaning |\n|---|---|---|---|---|\n");
    for spec in KEYS {
        let min = if spec.min > 0 {
            format!(" (at least {})", spec.min)
        } else {
            String::new()
        };
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {}{} |\n",
            spec.name,
            spec.kind.table_name(),
            spec.default.table_text(),
            spec.origin.table_text(),
            spec.meaning.replace('|', "\\|"),
            min,
        ));
    }
    out
}

/// The config keys as a migration from the Python agent sees them, generated from [`KEYS`]:
/// which keys it knows, which are new here, and each default. `docs/migrating.md` holds a
/// copy between `<!-- migration-table:start -->` and `<!-- migration-table:end -->`.
pub fn migration_table_markdown() -> String {
    let mut out = String::from("| Key | In the Python agent | Here, by default |\n|---|---|---|\n");
    for spec in KEYS {
        let python = match spec.origin {
            Origin::BothPython => "the same key, in both versions",
            Origin::CurrentPython => "the same key, in the current version",
            Origin::PythonCli => "set from `--token-file`, which still wins",
            Origin::Compat => {
                "refused by its schema (older documents name it); accepted and unused here"
            }
            Origin::ThisAgent => "absent: new here",
        };
        out.push_str(&format!(
            "| `{}` | {python} | {} |\n",
            spec.name,
            spec.default.table_text()
        ));
    }
    out
}
