//! The command line: `--help` lists every variable the process reads,
//! arguments it does not take are refused, docs/CONFIGURATION.md matches.

use mesh_data::Config;
use mesh_testkit::help;

const BIN: &str = env!("CARGO_BIN_EXE_mesh-data");

#[test]
fn help_lists_every_variable_the_process_reads() {
    let sources = ["services/data/src", "libs/runtime/src", "libs/db/src", "libs/client/src"];
    // The data service has no Redis connection of its own.
    help::assert_help_lists_every_variable(BIN, &Config::help(), &sources, &["MESH_REDIS_"]).unwrap();
}

#[test]
fn unknown_arguments_are_refused() {
    help::assert_unknown_argument_refused(BIN).unwrap();
}

#[test]
fn configuration_docs_match_help() {
    help::assert_documented(BIN, "mesh-data", &["--help"]).unwrap();
}
