//! The command line: `--help` lists every variable the service reads,
//! arguments and commands it does not take are refused,
//! docs/CONFIGURATION.md matches `--help` and each tool's `--help`.

use mesh_audit::Config;
use mesh_testkit::help;

const BIN: &str = env!("CARGO_BIN_EXE_mesh-audit");

#[test]
fn help_lists_every_variable_the_process_reads() {
    let sources = ["services/audit/src", "libs/runtime/src", "libs/db/src"];
    // The audit service has no Redis connection.
    help::assert_help_lists_every_variable(BIN, &Config::help(), &sources, &["MESH_REDIS_"]).unwrap();
}

#[test]
fn unknown_arguments_are_refused() {
    help::assert_unknown_argument_refused(BIN).unwrap();
}

#[test]
fn configuration_docs_match_help() {
    help::assert_documented(BIN, "mesh-audit", &["--help"]).unwrap();
    for tool in ["verify", "export", "retention", "keygen"] {
        help::assert_documented(BIN, "mesh-audit", &[tool, "--help"]).unwrap();
    }
}
