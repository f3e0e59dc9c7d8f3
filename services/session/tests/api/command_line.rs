//! The command line: `--help` lists every variable the process reads,
//! arguments it does not take are refused, docs/CONFIGURATION.md matches.

use mesh_session::Config;
use mesh_testkit::help;

const BIN: &str = env!("CARGO_BIN_EXE_mesh-session");

#[test]
fn help_lists_every_variable_the_process_reads() {
    let sources = ["services/session/src", "libs/runtime/src", "libs/client/src"];
    help::assert_help_lists_every_variable(BIN, &Config::help(), &sources, &[]).unwrap();
}

#[test]
fn unknown_arguments_are_refused() {
    help::assert_unknown_argument_refused(BIN).unwrap();
}

#[test]
fn configuration_docs_match_help() {
    help::assert_documented(BIN, "mesh-session", &["--help"]).unwrap();
}
